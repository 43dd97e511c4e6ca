"""The one training loop every recovery stage uses (loop.py), the process group under torchrun (distributed.py)
and sharded training with FSDP2 (sharding.py)."""
