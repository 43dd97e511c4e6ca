"""Quantized dense layers at prefill (issue 22 item 3) and where torch's int8 / int4 kernels give way to decoding.

    layers     per layer at the 1.26B Llama's MLP shapes (5632x2048, 2048x5632), weights N(0, 1/fan_in), 512 input
               rows, 2 threads: dense F.linear against the old path (the weight dequantized in PyTorch, then
               F.linear) and the new one (compiled decode into a reused tile + torch's GEMM), int8 per row and
               int4 in groups of 128; median ms of alternating calls, ratios from the same run; the peak RSS each
               path adds during a call, each in a fresh process (what it allocates beyond the layer).
    crossover  5632x2048 at 1, 2, 4, ... 512 input rows: torch's kernel (int8 / int4) against the decoded path;
               the limit is the largest row count up to which the kernel won at every count (KERNEL_MAX_ROWS in
               compresscli/kernels/quantized.py). Up to 16 rows calls run round robin over copies exceeding 1 GB,
               as a model's layers do (no cache reuse between calls); past it (compute-bound) over two copies.

    flock /tmp/timing.lock python benchmarks/quantized_prefill.py layers
    flock /tmp/timing.lock python benchmarks/quantized_prefill.py crossover --dtypes bfloat16

Results: benchmarks/results/quantized_prefill.json (merged across runs) and .md (rewritten from it).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import Quantizer
from compresscli.codecs.quantized_linear.inference import CompactQuantizedLinear
from compresscli.codecs.quantized_linear.training import QuantizedLinear
from compresscli.commands.bench import device_name
from compresscli.kernels import quantized as qk

ROOT = Path(__file__).resolve().parent
RAW = ROOT / "results" / "quantized_prefill.json"
REPORT = ROOT / "results" / "quantized_prefill.md"
SHAPES = [(5632, 2048), (2048, 5632)]
SPECS = {"int8": QuantSpec(8), "int4": QuantSpec(4, 128)}
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def make_layer(form: str, out: int, inputs: int, dtype: torch.dtype) -> tuple[torch.Tensor, CompactQuantizedLinear]:
    """(the dense weight, its round-to-nearest quantized inference form)."""
    torch.manual_seed(0)
    dense = nn.Linear(inputs, out, bias=False)
    nn.init.normal_(dense.weight, std=inputs ** -0.5)
    dense = dense.to(dtype)
    weight = dense.weight.detach().clone()
    layer = QuantizedLinear.from_dense(dense, *Quantizer.fit(dense.weight.detach(), SPECS[form]))
    return weight, CompactQuantizedLinear.from_tensors(layer.to_tensors(), layer.codec_params())


def paths(weight: torch.Tensor, layer: CompactQuantizedLinear) -> dict:
    """Each product forced: dense F.linear, the old dequantize + F.linear, the compiled decode + GEMM, the kernel."""
    group = layer.spec.group(layer.in_features)
    if layer.kernel == "int8":
        new = lambda x: qk.decoded_int8_mm(x, layer.values.codes, layer.values.scales, group, None)  # noqa: E731
        kernel = lambda x: qk.int8_mm(x, layer.values.codes, layer.values.scales.reshape(-1).to(x.dtype), None)  # noqa: E731
    else:
        new = lambda x: qk.decoded_int4_mm(x, layer.values.codes, group, layer.scales_and_zeros, None,  # noqa: E731
                                           layer.out_features)
        kernel = lambda x: qk.int4_mm(x, layer.values.codes, group, layer.scales_and_zeros.to(x.dtype), None,  # noqa: E731
                                      layer.out_features)
    return {"dense": lambda x: F.linear(x, weight), "old": lambda x: qk.dequantized_mm(x, layer.dense_weight(), None),
            "new": new, "kernel": kernel}


def _alternating_ms(runs: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of each run, called in turn (so load on the machine falls on all alike)."""
    times = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run(x)
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _peak_child(path: str, form: str, out: int, inputs: int, dtype: str, rows: int) -> None:
    """In a fresh process: the peak RSS a call of `path` adds (VmHWM reset after the layer is built)."""
    weight, layer = make_layer(form, out, inputs, getattr(torch, dtype))
    run = paths(weight, layer)[path]
    x = torch.randn(rows, inputs).to(weight.dtype)
    rss = lambda key: int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = rss("VmRSS:")
    with torch.no_grad():
        for _ in range(3):
            run(x)
    print(json.dumps({"peak_mb": (rss("VmHWM:") - before) / 1024}))


def _peak_mb(path: str, form: str, out: int, inputs: int, dtype: str, rows: int, threads: int) -> float:
    code = (f"import torch, quantized_prefill as q; torch.set_num_threads({threads}); "
            f"q._peak_child({path!r}, {form!r}, {out}, {inputs}, {dtype!r}, {rows})")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def measure_layers(dtype: str, rows: int, repeats: int, threads: int) -> list[dict]:
    entries = []
    for out, inputs in SHAPES:
        for form in SPECS:
            weight, layer = make_layer(form, out, inputs, getattr(torch, dtype))
            x = torch.randn(rows, inputs).to(weight.dtype)
            runs = paths(weight, layer)
            ms = _alternating_ms({k: runs[k] for k in ("dense", "old", "new")}, x, repeats)
            with torch.no_grad():
                layer(x)
            peak = {k: _peak_mb(k, form, out, inputs, dtype, rows, threads) for k in ("dense", "old", "new")}
            entry = {"kind": "layers", "shape": [out, inputs], "dtype": dtype, "form": form, "rows": rows, "ms": ms,
                     "peak_mb": peak, "path": layer.last_path}
            print(json.dumps(entry), flush=True)
            entries.append(entry)
    return entries


def measure_crossover(dtype: str, repeats: int, cache_bytes: float) -> list[dict]:
    out, inputs = SHAPES[0]
    entries = []
    for form in SPECS:
        weight, layer = make_layer(form, out, inputs, getattr(torch, dtype))
        if layer.kernel is None:
            continue
        held = sum(t.numel() * t.element_size() for t in layer.buffers())
        layers = [layer] + [copy.deepcopy(layer) for _ in range(int(cache_bytes // held))]
        per_copy = [paths(weight, each) for each in layers]
        timings, limit, lost = {}, 0, False
        for n in ROWS:
            x = torch.randn(n, inputs).to(weight.dtype)
            ms = {}
            for path in ("kernel", "new"):  # past 16 rows compute-bound: two copies, fewer sweeps
                runs = [p[path] for p in (per_copy if n <= 16 else per_copy[:2])]
                with torch.no_grad():
                    runs[0](x)
                    sweeps = []
                    for _ in range(repeats if n <= 16 else max(3, repeats // 2)):
                        start = time.perf_counter()
                        for run in runs:
                            run(x)
                        sweeps.append((time.perf_counter() - start) / len(runs))
                ms[path] = statistics.median(sweeps) * 1e3
            timings[n] = ms
            lost = lost or ms["kernel"] > ms["new"]
            limit = limit if lost else n
        entry = {"kind": "crossover", "shape": [out, inputs], "dtype": dtype, "form": form, "ms": timings,
                 "kernel_max_rows": limit, "copies": len(layers)}
        print(json.dumps(entry), flush=True)
        entries.append(entry)
    return entries


def _key(entry: dict) -> tuple:
    return entry["kind"], tuple(entry["shape"]), entry["dtype"], entry["form"]


def write_report(entries: list[dict]) -> None:
    lines = ["# Quantized dense layers at prefill (issue 22 item 3)", "",
             "Generated by `benchmarks/quantized_prefill.py` from quantized_prefill.json (2 threads, torch "
             f"{torch.__version__}, {device_name(torch.device('cpu'))}).", "",
             "## Per layer, 512 input rows", "",
             "`flock /tmp/timing.lock python benchmarks/quantized_prefill.py layers` -- old: the weight dequantized "
             "in PyTorch + F.linear; new: compiled decode into a reused tile + torch's GEMM. Peak MB: what a call "
             "adds to the process's peak RSS (fresh process per path; the new path's tile is kept per thread and "
             "reused by every layer).", "",
             "| shape (out x in) | dtype | form | dense ms | old ms | new ms | old vs dense | new vs dense | "
             "peak MB dense / old / new | layer's path |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted((e for e in entries if e["kind"] == "layers"), key=_key):
        ms, peak = e["ms"], e["peak_mb"]
        lines.append(f"| {e['shape'][0]}x{e['shape'][1]} | {e['dtype']} | {e['form']} | {ms['dense']:.1f} | "
                     f"{ms['old']:.1f} | {ms['new']:.1f} | {ms['dense'] / ms['old']:.2f}x | "
                     f"{ms['dense'] / ms['new']:.2f}x | {peak['dense']:.0f} / {peak['old']:.0f} / {peak['new']:.0f} | "
                     f"{e['path']} |")
    lines += ["", "## Kernel vs decoded, by input rows (the KERNEL_MAX_ROWS crossover)", "",
              "`flock /tmp/timing.lock python benchmarks/quantized_prefill.py crossover --dtypes DTYPE` -- ms per "
              "call, round robin over copies exceeding 1 GB up to 16 rows, over two copies past it.", ""]
    for e in sorted((e for e in entries if e["kind"] == "crossover"), key=_key):
        lines += [f"### {e['form']} {e['dtype']} {e['shape'][0]}x{e['shape'][1]}: kernel up to "
                  f"{e['kernel_max_rows']} rows", "", "| rows | kernel ms | decoded ms |", "|---|---|---|"]
        lines += [f"| {n} | {ms['kernel']:.3f} | {ms['new']:.3f} |" for n, ms in e["ms"].items()]
        lines.append("")
    REPORT.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["layers", "crossover", "report"])
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-bytes", type=float, default=1.0e9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entries = json.loads(RAW.read_text()) if RAW.is_file() else []
    for dtype in args.dtypes.split(",") if args.what != "report" else []:
        new = (measure_layers(dtype, args.rows, args.repeats, args.threads) if args.what == "layers"
               else measure_crossover(dtype, args.repeats, args.cache_bytes))
        keys = {_key(e) for e in new}
        entries = [e for e in entries if _key(e) not in keys] + new
        RAW.write_text(json.dumps(entries, indent=1))
    write_report(entries)


if __name__ == "__main__":
    main()
