"""`python -m compresscli`: the `compress` command; also what torchrun runs (`torchrun -m compresscli run ...`)."""
from compresscli.cli import main

if __name__ == "__main__":
    main()
