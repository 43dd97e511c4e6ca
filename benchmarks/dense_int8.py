"""The compiled dense int8 kernel (kernels/cpu_source.py `dense_q8_mm`, path `cpu-int8`) against what else can run
a symmetric int8 layer at few input rows: torch's weight-only int8 kernel (per-row scales only), decode + GEMM
(kernels/quantized.py `decoded_int8_mm`), and the dense layer in the same dtype.

Per shape (MiniLM's MLP layers, a Llama MLP layer), activation dtype and input rows, each product is timed round
robin over copies exceeding 1 GB (no cache reuse between calls: what a model's decode sees), median of sweeps;
the weight is N(0, 1/in) (the trained scale), int8 with one scale per row in the activations' dtype. The table
backs kernels/quantized.py's DENSE_INT8_MAX_ROWS and KERNEL_MAX_ROWS for int8.

    flock /tmp/timing.lock python benchmarks/dense_int8.py      # -> benchmarks/results/dense_int8.md
"""
from __future__ import annotations

import argparse
import platform
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from compresscli.kernels import cpu
from compresscli.kernels import quantized as qk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import _time_round_robin  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "dense_int8.md"


def _dense_int8(x: torch.Tensor, q: tuple[torch.Tensor, torch.Tensor], group: int) -> torch.Tensor:
    return qk.dense_int8_mm(x, q[0], q[1], group, None)


def _decoded_int8(x: torch.Tensor, q: tuple[torch.Tensor, torch.Tensor], group: int) -> torch.Tensor:
    return qk.decoded_int8_mm(x, q[0], q[1], group, None)


def _torch_int8(x: torch.Tensor, q: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return qk.int8_mm(x, q[0], q[1].reshape(-1), None)


def measure(shape: tuple[int, int], dtype: torch.dtype, rows: list[int], cache_bytes: float) -> list[str]:
    out_f, in_f = shape
    torch.manual_seed(0)
    weight = torch.randn(out_f, in_f) / in_f ** 0.5
    scales = (weight.abs().amax(1, keepdim=True) / 127).to(dtype)
    codes = (weight / scales.float()).round().clamp(-127, 127).to(torch.int8)
    dense = (codes.float() * scales.float()).to(dtype)
    copies = max(2, int(cache_bytes // codes.numel()) + 1)
    quantized = [(qk.aligned(codes.clone()), scales.clone()) for _ in range(copies)]
    dense_copies = [dense.clone() for _ in range(max(2, int(cache_bytes // (dense.numel() * dense.element_size())) + 1))]
    torch_kernel = dtype != torch.float16 and qk.int8_supported(in_f)
    lines = []
    for n in rows:
        x = torch.randn(n, in_f).to(dtype)
        products = {"dense": ([partial(F.linear, weight=w) for w in dense_copies], 15),
                    "ours": ([partial(_dense_int8, q=q, group=in_f) for q in quantized], 15),
                    "decoded": ([partial(_decoded_int8, q=q, group=in_f) for q in quantized[:4]], 5)}
        if torch_kernel:
            products["torch"] = ([partial(_torch_int8, q=q) for q in quantized], 15)
        us = {name: _time_round_robin(calls, x, sweeps, budget_s=10) * 1e6 for name, (calls, sweeps) in products.items()}
        best = min(("ours", "decoded", "torch"), key=lambda k: us.get(k, float("inf")))
        torch_us = f"{us['torch']:.0f}" if torch_kernel else "-"
        lines.append(f"| {out_f}x{in_f} | {str(dtype).removeprefix('torch.')} | {n} | {us['dense']:.0f} | "
                     f"{us['ours']:.0f} | {us['dense'] / us['ours']:.2f}x | {torch_us} | {us['decoded']:.0f} | {best} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1536x384,384x1536,3072x768,5632x2048,2048x5632")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-bytes", type=float, default=1.0e9)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    lines = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        for dtype in args.dtypes.split(","):
            lines += measure((out_f, in_f), getattr(torch, dtype), rows, args.cache_bytes)
    command = (f"flock /tmp/timing.lock python benchmarks/dense_int8.py --shapes {args.shapes} --dtypes {args.dtypes} "
               f"--rows {args.rows} --threads {args.threads}")
    args.out.write_text("\n".join([
        "# The dense int8 kernel against torch's int8 kernel, decode + GEMM and dense (issues 21, 22)", "",
        f"`{command}`; {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"kernels built for {cpu.isa()}; us per call, round robin over copies exceeding {args.cache_bytes / 1e9:.1f} GB "
        "(benchmarks/decode.py's timing: median of up to 15 sweeps, at least 3 where they take over 10 s); one scale "
        "per row; ratios from this one run. `torch`: "
        "aten._weight_int8pack_mm (no float16 path here: it is plain loops, and per-row scales only).", "",
        "| layer (out x in) | activations | rows | dense same dtype us | dense int8 kernel us | vs dense | "
        "torch int8 kernel us | decode + GEMM us | fastest int8 |",
        "|---|---|---|---|---|---|---|---|---|", *lines, ""]))


if __name__ == "__main__":
    main()
