"""Condensed (constant fan-in) layer products against dense, torch CSR and the naive gather, in one run.

For each layer shape (IN x OUT, i.e. IN -> OUT features), sparsity and batch size, every method computes
y = x @ W_masked.T + b for the same random weights, condensed exactly as the `condensed` method does
(per-neuron top-k of |W|):

  dense    F.linear on the masked dense weight (oneDNN/MKL on CPU, cuBLAS on CUDA)
  csr      torch sparse CSR weight: addmm(b, W_csr, x.T).T
  gather   the definition in PyTorch: (x[:, idx] * v).sum(-1), chunked (kernels.reference.gather_mm)
  tool     what CondensedLinear runs: the path kernels.dispatch chooses (named in the table)
  forced   the dispatcher's paths it did not choose: its dense path (scatter the condensed weight to
           dense, then F.linear) and the compiled CPU kernel (on CUDA: the Triton gemv / tiled kernels)

Timing: warm-up calls, then repeats in which the methods alternate (method A, B, C, ... A, B, C, ...),
so a neighbour process that steals a core slows every method of a cell alike; the median of the
repeats is reported. The number of repeats adapts to each method's speed (--budget seconds per method
and cell, at least --min-repeats, or 3 for calls over 0.1 s); a method whose first call takes longer than
--max-call seconds is not repeated and shows as "-" (dense, the reference of the ratios, always runs).
The load average before and after the run is printed with the table. On a machine shared with busy
processes, `--threads 1 --clock thread` times this thread's CPU time, which leaves out the slices the
scheduler gives to the others (results/condensed_layers.md shows why that matters).

    python benchmarks/condensed_layers.py                        # CPU, 2 threads, every shape (6 min here)
    python benchmarks/condensed_layers.py --shapes 3072x768 --sparsities 0.9 --batches 1
    python benchmarks/condensed_layers.py --threads 1 --clock thread   # one core, CPU time
    python benchmarks/condensed_layers.py --device cuda          # bf16 on the GPU (cuBLAS vs Triton)
    python benchmarks/condensed_layers.py --out benchmarks/results/condensed_layers.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from compresscli.kernels import dispatch, force_path
from compresscli.kernels.reference import gather_mm, scatter_dense
from compresscli.methods.condensed import CondensedConfig, fan_in_k, top_k_indices
from compresscli.codecs.sparse.encoding import index_dtype
from compresscli.commands.bench import device_name, load_average

DEFAULT_SHAPES = "768x3072,3072x768,4096x11008,11008x4096"


def make_layer(in_features: int, out_features: int, sparsity: float, dtype: torch.dtype, device: torch.device,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights condensed like the method does: per-neuron top-k of |W|, sorted indices."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    k = fan_in_k(in_features, CondensedConfig(sparsity=sparsity))
    indices = top_k_indices(weight.abs(), k).to(index_dtype(in_features))
    values = weight.gather(1, indices.long())
    bias = torch.randn(out_features, generator=generator) * 0.1
    layer = {"values": values, "indices": indices, "bias": bias}
    layer = {name: t.to(device) if name == "indices" else t.to(device, dtype) for name, t in layer.items()}
    layer["dense"] = scatter_dense(layer["values"], layer["indices"], in_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        layer["csr"] = layer["dense"].to_sparse_csr()
    return layer


def methods_for(layer: dict[str, torch.Tensor], x: torch.Tensor, in_features: int,
                device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    v, idx, b = layer["values"], layer["indices"], layer["bias"]

    def auto() -> torch.Tensor:
        return dispatch.condensed_mm(x, v, idx, b, in_features)[0]

    def forced(path: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with force_path(path):
                return dispatch.condensed_mm(x, v, idx, b, in_features)[0]
        return run

    table = {"dense": lambda: F.linear(x, layer["dense"], b),
             "csr": lambda: torch.addmm(b[:, None], layer["csr"], x.t()).t(),
             "gather": lambda: gather_mm(x, v, idx, b),
             "auto": auto}
    # The dispatcher's other paths, forced, to show what they would have done: its own dense path (scatter
    # to a dense weight, then F.linear: what a condensed layer costs without a kernel) and the compiled
    # kernels. The chosen path is not timed twice (the second copy would run on the first one's warm caches).
    chosen = dispatch.condensed_mm(x, v, idx, b, in_features)[1]
    for path in ("dense", "cpu", "triton_gemv", "triton_tiled"):
        if path in dispatch.available_paths(device, x.dtype) and path != chosen:
            table[f"path:{path}"] = forced(path)
    return table


def runnable(methods: dict[str, Callable[[], torch.Tensor]]) -> dict[str, Callable[[], torch.Tensor]]:
    """The methods that run for this device and dtype (e.g. CSR matmul lacks some dtypes on some
    devices); the others are reported on stderr and left out, so one gap does not end the run."""
    kept = {}
    for name, fn in methods.items():
        try:
            fn()
        except (RuntimeError, NotImplementedError) as err:
            print(f"{name} cannot run here, left out: {str(err).splitlines()[0]}", file=sys.stderr)
            continue
        kept[name] = fn
    return kept


class Timer:
    """Seconds per call of `fn`: CUDA events (over `number` calls) on a GPU; on CPU the wall clock, or
    with clock="thread" the CPU time of this thread (single-threaded runs only): on a machine shared with
    other busy processes, wall time counts the slices the scheduler gives to them, CPU time does not."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.cuda = device.type == "cuda"
        self.clock = time.thread_time if clock == "thread" else time.perf_counter

    def __call__(self, fn: Callable[[], torch.Tensor], number: int = 1) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / number
        started = self.clock()
        for _ in range(number):
            fn()
        return (self.clock() - started) / number


def time_cell(methods: dict[str, Callable[[], torch.Tensor]], timer: Timer, args: argparse.Namespace,
              cuda: bool, flush: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """Median and 10th percentile seconds per call per method, the methods alternating within each repeat;
    methods missing from the result were too slow to repeat."""
    repeats, number = {}, {}
    for name, fn in methods.items():
        first = timer(fn)
        if first > args.max_call and name != "dense":
            continue  # too slow to repeat within the run's budget (dense, the reference, always runs)
        for _ in range(args.warmup if first < 0.05 else 0):  # a slow first call has warmed up enough
            first = min(first, timer(fn))
        # On CUDA one sample runs enough calls to last ~1 ms, so launch jitter averages out.
        number[name] = max(1, int(1e-3 / max(first, 1e-7))) if cuda else 1
        fewest = args.min_repeats if first < 0.1 else 3  # keep the slow baselines (gather, CSR) affordable
        repeats[name] = max(fewest, min(args.max_repeats, int(args.budget / max(first * number[name], 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in repeats}
    for rep in range(max(repeats.values(), default=0)):
        for name in repeats:
            if rep < repeats[name]:
                if flush is not None:
                    flush()
                samples[name].append(timer(methods[name], number[name]))
    stats = {}
    for name in methods:
        if name in samples:
            ordered = sorted(samples[name])
            stats[name] = {"median": statistics.median(ordered), "p10": ordered[len(ordered) // 10],
                           "repeats": len(ordered)}
    return stats


def cache_flusher(device: torch.device) -> Callable[[], None]:
    """Evict the caches between samples (a layer inside a model finds its weights in DRAM, not in L2/L3)."""
    buffer = torch.zeros(64 << 20 >> 2, device=device)  # 64 MiB, twice this machine's L3

    def flush() -> None:
        buffer.add_(1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return flush


def check_agreement(methods: dict[str, Callable[[], torch.Tensor]], dtype: torch.dtype) -> float:
    """Largest relative difference of any method from dense (all compute the same product)."""
    with torch.no_grad():
        ref = methods["dense"]().float()
        scale = ref.abs().max().item() + 1e-6
        return max((fn().float() - ref).abs().max().item() / scale for fn in methods.values())


def bytes_ratio(in_features: int, k: int, dtype: torch.dtype) -> float:
    """Bytes of values + indices against the dense weight's: the memory-bound limit of the speed-up."""
    value_bytes = torch.finfo(dtype).bits // 8
    index_bytes = torch.iinfo(index_dtype(in_features)).bits // 8
    return k * (value_bytes + index_bytes) / (in_features * value_bytes)


def render(rows: list[dict], meta: dict) -> str:
    names = [n for n in ("csr", "gather") if any(n in r["ms"] for r in rows)]
    forced = [n for n in ("path:dense", "path:cpu", "path:triton_gemv", "path:triton_tiled")
              if any(n in r["ms"] for r in rows)]
    header = ["shape (in x out)", "sparsity", "k", "batch", "dense ms"] + [f"{n} ms (x)" for n in names] + \
             ["tool: path", "tool ms (x)"] + [f"{n.removeprefix('path:')} forced, ms (x)" for n in forced] + \
             ["bytes vs dense"]
    lines = [f"Device: {meta['device_name']} ({meta['device']}, {meta['dtype']}"
             + (f", {meta['threads']} threads" if meta["threads"] else "") + f"), torch {meta['torch']}, "
             f"caches {meta['caches']}, {meta['clock']}.",
             f"Load average (1, 5, 15 min; {os.cpu_count()} logical cores) before: {_load(meta['load_before'])}; "
             f"after: {_load(meta['load_after'])}. "
             f"Run took {meta['seconds']:.0f} s.",
             "Times are medians of alternating repeats; (x) = dense time / method time, so >1 is faster than "
             "dense. dense = F.linear on the stored dense weight (the original layer). 'tool' is what "
             "CondensedLinear runs (kernels.dispatch's automatic choice, named); the paths it did not choose are "
             "timed forced in the last columns: 'dense forced' scatters the condensed weight to dense on every call "
             "('-' where the path was chosen, or where a warm-up call took longer than --max-call). "
             "'bytes vs dense' = (value + index "
             "bytes) / dense bytes: its inverse is the speed-up limit where the layer is memory-bound.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        dense = r["ms"].get("dense")

        def cell(name: str) -> str:
            t = r["ms"].get(name)
            if t is None:
                return "-"
            return f"{t:.3f} ({dense / t:.2f}x)" if dense else f"{t:.3f}"

        line = [r["shape"], f"{r['sparsity']:.2f}", str(r["k"]), str(r["batch"]),
                "-" if dense is None else f"{dense:.3f}"] + [cell(n) for n in names] + \
               [r["auto_path"], cell("auto")] + [cell(n) for n in forced] + [f"{r['bytes_ratio']:.3f}"]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _load(values: list[float] | None) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "unknown"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            a, b = item.lower().split("x")
            shapes.append((int(a), int(b)))
        except ValueError:
            raise SystemExit(f"bad shape {item!r}: write IN x OUT, e.g. 3072x768") from None
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                      "bfloat16 on CUDA)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the kernel uses as many)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated IN x OUT layer shapes")
    parser.add_argument("--sparsities", default="0.8,0.9,0.95,0.99")
    parser.add_argument("--batches", default="1,8,64,256", help="input rows (tokens) per call")
    parser.add_argument("--methods", default=None, help="subset of csr,gather,auto,path:dense,path:cpu,path:triton_gemv,"
                                                        "path:triton_tiled (dense always runs: ratios are to dense)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--max-repeats", type=int, default=200)
    parser.add_argument("--budget", type=float, default=0.2, help="seconds of repeats per method and cell")
    parser.add_argument("--max-call", type=float, default=0.5, help="methods slower than this per call are skipped")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="CPU timing: wall clock, or this thread's CPU time (with --threads 1; robust to a busy machine)")
    parser.add_argument("--flush", action="store_true", help="evict the caches (64 MiB write) before every timed call")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_num_threads(args.threads)
    if args.clock == "thread" and (args.threads != 1 or device.type != "cpu"):
        raise SystemExit("--clock thread measures one thread's CPU time: use it with --threads 1 on the CPU")
    timer = Timer(device, args.clock)
    wanted = None if args.methods is None else {"dense", *args.methods.split(",")}
    meta = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "threads": args.threads if device.type == "cpu" else None, "torch": torch.__version__,
            "caches": "flushed before every call" if args.flush else "warm (no flush)",
            "clock": "CUDA events" if device.type == "cuda" else
                     ("thread CPU time" if args.clock == "thread" else "wall clock"),
            "device_name": device_name(device),
            "load_before": load_average(), "command": " ".join(["python", *sys.argv])}
    flush = cache_flusher(device) if args.flush else None
    started = time.time()
    rows = []
    with torch.no_grad():
        for in_features, out_features in parse_shapes(args.shapes):
            for sparsity in [float(s) for s in args.sparsities.split(",")]:
                layer = make_layer(in_features, out_features, sparsity, dtype, device)
                k = layer["values"].shape[1]
                for batch in [int(b) for b in args.batches.split(",")]:
                    x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(1)).to(device, dtype)
                    methods = methods_for(layer, x, in_features, device)
                    if wanted is not None:
                        methods = {n: f for n, f in methods.items() if n in wanted}
                    methods = runnable(methods)
                    auto_path = dispatch.condensed_mm(x, layer["values"], layer["indices"], layer["bias"],
                                                      in_features)[1]
                    error = check_agreement(methods, dtype) if batch <= 64 else None
                    stats = time_cell(methods, timer, args, device.type == "cuda", flush)
                    row = {"shape": f"{in_features}x{out_features}", "in": in_features, "out": out_features,
                           "sparsity": sparsity, "k": k, "batch": batch, "auto_path": auto_path,
                           "ms": {n: t["median"] * 1e3 for n, t in stats.items()},
                           "p10_ms": {n: t["p10"] * 1e3 for n, t in stats.items()},
                           "repeats": {n: t["repeats"] for n, t in stats.items()},
                           "bytes_ratio": bytes_ratio(in_features, k, dtype), "max_rel_diff": error}
                    rows.append(row)
                    shown = ", ".join(f"{n} {t:.3f}" for n, t in row["ms"].items() if t is not None)
                    print(f"{row['shape']} s={sparsity} n={batch}: {shown} ms (auto={auto_path})",
                          file=sys.stderr, flush=True)
                del layer
    meta["load_after"] = load_average()
    meta["seconds"] = time.time() - started
    table = render(rows, meta)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Condensed layer products\n\n    {meta['command']}\n\n{table}\n")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
