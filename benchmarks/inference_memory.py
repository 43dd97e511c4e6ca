"""Loaded compressed models against their originals: bytes on disk, resident memory, latency.

Every method compresses the MLP weights of each real model with no recovery (neither memory nor
latency depends on the values), the output is written, and then what `compresscli.load(OUT)` returns
is measured against the original as `transformers` / `timm` load it:
- resident MB loading adds and the peak a forward adds above it, each read in a fresh process with the
  libraries imported and a warm-up load and forward done first (`compresscli.commands.bench.measure_memory`);
- the bytes of the loaded model's tensors (parameters and buffers, each storage once), exact where the
  resident set is a reading;
- forward latency at two input sizes, the two models alternating repeat by repeat in one process
  (`compresscli.commands.bench.measure_speed`, what `compress bench` runs), and the ratio original / compressed
  (> 1: the compressed model is faster);
- the ceiling any MLP compression has: the original timed against itself with its MLP layers made free
  (each returns zeros of its output's shape at once), so "MLP free" is the speed-up of an infinitely fast
  MLP kernel (Amdahl's bound).

    python benchmarks/inference_memory.py --out benchmarks/results/inference_memory.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from torch import nn

from compresscli.model.architecture import detect
from compresscli.io.checkpoint import load_checkpoint
from compresscli.codecs.base import replace_module
from compresscli.engine.options import RunOptions
from compresscli.engine.run import compress_source
from compresscli.engine.recipe import parse_recipe
from compresscli.io.source import open_source
from compresscli.commands.bench import measure_memory, measure_speed

METHODS = {  # name: (method, params); every one targets the MLP weights and runs no recovery
    "magnitude 50%": ("magnitude", "{sparsity: 0.5, scope: global}"),
    "magnitude 90%": ("magnitude", "{sparsity: 0.9, scope: global}"),
    "fips 40%": ("fips", "{budget: 0.4, steps: 0}"),
    "rps 10x": ("rps", "{compression: 10}"),
    "condensed 90%": ("condensed", "{sparsity: 0.9}"),
}
MODELS = {  # name: (source, --data, input sizes as (batch, tokens); images have no token count)
    "minilm": ("ref:minilm", None, ((1, 16), (8, 128))),
    "digits-vit": ("ref:digits-vit", "digits", ((1, None), (256, None))),
}


def recipe_for(method: str, params: str):
    text = f"description: '{method} {params} on the MLP, no recovery'\nstages:\n  - method: {method}\n" \
           f"    targets: [mlp]\n    params: {params}\n"
    return parse_recipe(text, "<benchmark>")


class Free(nn.Module):
    """A layer that costs nothing: zeros of its output's shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def mlp_free(name: str) -> nn.Module:
    """The original of `name` with every MLP Linear replaced by a Free layer."""
    model = load_checkpoint(MODELS[name][0]).model
    for layer in detect(model).resolve(["mlp"], model, "mlp"):
        replace_module(model, layer, Free(model.get_submodule(layer).out_features))
    return model


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (shared ones too)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


def timing(original, compressed, task, sizes, args) -> list[dict]:
    """One measure_speed run per input size (token counts differ), each a (batch, tokens) row."""
    rows = []
    for batch, tokens in sizes:
        result = measure_speed(original, compressed, task, batch_sizes=(batch,), threads=args.threads,
                               warmup=args.warmup, repeats=args.repeats, seq_len=tokens or 16)
        row = result["batches"][0]
        rows.append({"size": f"{batch} x {tokens}" if tokens else f"{batch}", "original": row["original_ms"]["median"],
                     "compressed": row["compressed_ms"]["median"], "ratio": row["speedup"],
                     "kernels": row["kernels"], "load": result["load_average"]})
    return rows


def measure_model(name: str, methods: list[str], args) -> list[str]:
    source, data, sizes = MODELS[name]
    original = load_checkpoint(source)
    original_memory = measure_memory(original, threads=args.threads)
    mb = lambda b: "-" if b is None else f"{b / 1e6:.1f}"  # noqa: E731
    size_names = [f"{b} x {t}" if t else f"batch {b}" for b, t in sizes]
    head = ("| model | file MB | tensor MB | resident MB added by loading | forward peak MB above it | "
            + " | ".join(f"{s}: ms (original / compressed)" for s in size_names) + " | kernels |")
    lines, originals, loads = [], [[] for _ in sizes], []
    for method in methods:
        kind, params = METHODS[method]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            compress_source(open_source(source), recipe_for(kind, params), out,
                            RunOptions(data=data, evaluate=False, calibration_examples=32))
            compressed = load_checkpoint(out)
            memory = measure_memory(compressed, threads=args.threads)
            rows = timing(original.model, compressed.model, compressed.task(), sizes, args)
            file_bytes, loaded_bytes = compressed.file_bytes, tensor_bytes(compressed.model)
            del compressed
        for seen, row in zip(originals, rows):
            seen.append(row["original"])
        loads += [r["load"] for r in rows]
        kernels = ", ".join(f"{k} x{v}" for k, v in sorted(rows[-1]["kernels"].items())) or "-"
        cells = " | ".join(f"{r['compressed']:.2f} ({r['ratio']:.2f}x)" for r in rows)
        lines.append(f"| {method} | {mb(file_bytes)} | {mb(loaded_bytes)} | {mb(memory['load_bytes'])} | "
                     f"{mb(memory['forward_peak_bytes'])} | {cells} | {kernels} |")
        print(lines[-1], flush=True)
    first = (f"| original | {mb(original.file_bytes)} | {mb(tensor_bytes(original.model))} | "
             f"{mb(original_memory['load_bytes'])} | {mb(original_memory['forward_peak_bytes'])} | "
             + " | ".join(f"{statistics.median(seen):.2f}" for seen in originals) + " | - |")
    free = timing(original.model, mlp_free(name), original.task(), sizes, args)
    bound = ("| MLP free (the ceiling) | - | - | - | - | "
             + " | ".join(f"{r['compressed']:.2f} ({r['ratio']:.2f}x)" for r in free) + " | - |")
    before = [l["before"][0] for l in loads if l and l.get("before")]
    return [f"## {name} ({source}), MLP weights compressed, {args.threads} threads", "",
            "Latency cells: the compressed model's median ms and, in brackets, original / compressed measured in "
            "the same run (the original's row: the median of its medians over those runs). 1-minute load average "
            f"before each timing: {min(before, default=0):.1f}-{max(before, default=0):.1f}.", "",
            head, "|" + "---|" * (6 + len(sizes)), first, *lines, bound, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names of METHODS")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    sections = []
    for name in args.models.split(","):
        sections += measure_model(name, methods, args)
    if args.out:
        command = "python " + " ".join(sys.argv)
        args.out.write_text("# Compressed models in memory: resident bytes and latency vs the original\n\n"
                            f"    {command}\n\n" + "\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
