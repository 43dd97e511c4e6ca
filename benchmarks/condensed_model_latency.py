"""Whole-model latency: the real MiniLM and digits ViT with their MLP weights condensed, against the originals.

Each model is compressed by the bundled `condensed-90` recipe with no recovery (latency does not depend on
the values), written out and loaded back, so what is timed is what `compresscli.load` returns. Then
`compresscli.commands.bench.measure_speed` (what `compress bench` runs) times both models at each batch size,
alternating them repeat by repeat, on synthetic inputs of the right shape.

    python benchmarks/condensed_model_latency.py                           # 2 threads, wall clock
    python benchmarks/condensed_model_latency.py --threads 1 --clock thread  # robust on a busy machine
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from compresscli.io.checkpoint import load_checkpoint
from compresscli.engine.options import RunOptions
from compresscli.engine.whole_model import run_recipe
from compresscli.engine.recipe import load_recipe
from compresscli.commands.bench import compare_checkpoints, render_markdown

MODELS = {"minilm": ("ref:minilm", None), "digits-vit": ("ref:digits-vit", "digits")}  # source, --data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default="minilm,digits-vit")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence for MiniLM")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    args = parser.parse_args()
    sections = []
    for name in args.models.split(","):
        source, data = MODELS[name]
        original = load_checkpoint(source)
        with tempfile.TemporaryDirectory() as tmp:
            recipe = load_recipe("condensed-90", [f"0.sparsity={args.sparsity}", "1.steps=0"])
            run_recipe(load_checkpoint(source), recipe, Path(tmp) / "out", RunOptions(data=data, evaluate=False))
            compressed = load_checkpoint(Path(tmp) / "out")
            compressed.name = f"{name}, MLP condensed at {args.sparsity:.0%}"
            result = compare_checkpoints(compressed, original, batch_sizes=tuple(int(b) for b in
                                                                                 args.batch_sizes.split(",")),
                                         device="cpu", warmup=args.warmup, repeats=args.repeats,
                                         threads=args.threads, seq_len=args.seq_len, clock=args.clock)
        sections.append(render_markdown(result))
        print(sections[-1] + "\n", flush=True)
    if args.out:
        command = "python " + " ".join(sys.argv)
        args.out.write_text(f"# Whole-model latency, MLP condensed vs original\n\n    {command}\n\n"
                            + "\n\n".join(sections) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
