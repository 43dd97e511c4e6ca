"""A 50% bitmask layer with int8 values (issue 21, item 4): the int8 row-sparse kernel against what it replaces.

Per layer (default 5632x2048, bfloat16 activations and checkpoint, the trained weight scale), at 1, 8 and 512 input
rows, each form timed round robin over copies exceeding the last-level cache (benchmarks/decode.py's timing):
    dense                 F.linear on the dense bf16 weight
    bitmask bf16          magnitude 50%, bf16 values (the float row-sparse kernel / decode + GEMM)
    bitmask int8 (old)    the same layer quantized int8 per row, run as before this change: every value
                          dequantized per call (plus its row index), then the float row-sparse kernel
    bitmask int8          the int8 row-sparse kernel on the codes and scales as held (cpu-int8 / decoded-int8)
    bitmask int8 g128     the same with a scale per 128 inputs
    ... forced            the int8 kernel, and decode + GEMM, at every row count (dispatch.Q8_KERNEL_MAX_ROWS)
with each form's resident bytes and the peak RSS one call adds (VmHWM reset through /proc/self/clear_refs).

    flock /tmp/timing.lock python benchmarks/sparse_int8.py      # -> benchmarks/results/sparse_int8.md
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import _compressed_layer, _time_round_robin  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "sparse_int8.md"


class OldFallback(nn.Module):
    """An int8 sparse layer's product as CompactSparse.mm ran it before the int8 kernels: dequantize, then the
    float kernels (what sub-byte values still do)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compresscli import kernels

        m = self.layer.matrix
        y, self.last_path = kernels.sparse_mm(x, m.float_values(), m.cols, m.row_ptr, self.layer.bias, *m.shape)
        return y


class Forced(nn.Module):
    """A layer run on one path (kernels.force_path): the kernel and decode + GEMM beside each other at every row
    count, which is what Q8_KERNEL_MAX_ROWS is chosen from."""

    def __init__(self, layer: nn.Module, path: str):
        super().__init__()
        self.layer, self.path = layer, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compresscli import kernels

        with kernels.force_path(self.path):
            y = self.layer(x)
        self.last_path = self.layer.last_path
        return y


def int8_layer(out_features: int, in_features: int, dtype: torch.dtype, group_size: int | None) -> nn.Module:
    """Magnitude 50% per layer, then its kept values int8 by round to nearest, in the inference form."""
    from compresscli import MagnitudeConfig, compress_
    from compresscli.codecs.forms import to_inference_
    from compresscli.methods.quantize import QuantizeConfig

    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(dense.weight, std=in_features ** -0.5)
    holder = nn.Sequential(dense.to(dtype))
    compress_(holder, MagnitudeConfig(sparsity=0.5, scope="layer"), None)
    compress_(holder, QuantizeConfig(bits=8, group_size=group_size, solver="rtn"), None)
    return to_inference_(holder)[0]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def call_peak_mb(layer: nn.Module, x: torch.Tensor) -> float:
    """The peak RSS one call adds over the RSS before it (Linux: VmHWM reset by clear_refs 5)."""
    with torch.no_grad():
        layer(x)  # buffers kept across calls (decode tiles, scratch) are not per-call cost
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kib("VmRSS:")
        layer(x)
        return (_rss_kib("VmHWM:") - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="5632x2048", help="out x in")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", default="1,8,16,32,512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-bytes", type=float, default=1.0e9)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-forced", action="store_true", help="skip the rows with the int8 path forced")
    args = parser.parse_args()
    from compresscli.commands.decode import tensor_bytes

    torch.set_num_threads(args.threads)
    out_features, in_features = map(int, args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    rows = [int(n) for n in args.rows.split(",")]
    forms = {"dense": _compressed_layer("dense", out_features, in_features, dtype),
             "bitmask bf16 values": _compressed_layer("magnitude-50", out_features, in_features, dtype),
             "bitmask int8 per row (old: dequantize per call)": OldFallback(int8_layer(out_features, in_features,
                                                                                     dtype, None)),
             "bitmask int8 per row (int8 kernel)": int8_layer(out_features, in_features, dtype, None),
             "bitmask int8 g128 (int8 kernel)": int8_layer(out_features, in_features, dtype, 128)}
    if not args.no_forced:
        forms["bitmask int8 per row, kernel forced"] = Forced(int8_layer(out_features, in_features, dtype, None), "cpu")
        forms["bitmask int8 per row, decode + GEMM forced"] = Forced(int8_layer(out_features, in_features, dtype, None),
                                                                     "decoded")
    times: dict[str, dict[int, tuple[float, str, float]]] = {}
    for name, layer in forms.items():
        held = tensor_bytes(layer)
        copies = max(2, int(args.cache_bytes // max(1, held)) + 1)
        layers = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
        times[name] = {}
        for n in rows:
            x = torch.randn(n, in_features).to(dtype)
            peak = call_peak_mb(layer, x)
            start = time.perf_counter()
            with torch.no_grad():
                layer(x)
            slow = time.perf_counter() - start > 5e-3  # compute-bound at this size: cache reuse is beside the point
            us = _time_round_robin(layers[:2] if slow or n > 32 else layers, x, 3 if slow or n > 32 else 15) * 1e6
            path = getattr(layer, "last_path", None) or "dense"
            times[name][n] = (us, path, peak)
            print(f"{name} rows {n}: {us:.0f} us ({path}), call peak +{peak:.1f} MB", flush=True)
        times[name]["held"] = held
        del layers
    lines = [f"# int8 values in the row-sparse kernel: {out_features}x{in_features} {args.dtype}, 50% bitmask",
             "", f"`flock /tmp/timing.lock python benchmarks/sparse_int8.py --shape {args.shape} --dtype {args.dtype} "
             f"--rows {args.rows} --threads {args.threads}`; {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; every form timed round robin over copies exceeding {args.cache_bytes / 1e9:.1f} GB "
             "(median of sweeps; calls over 5 ms: 3 sweeps over 2 copies); ratios against dense from this one run. `call peak` is the RSS one call adds.", "",
             "| form | resident MB | " + " | ".join(f"{n} rows us (path) | vs dense | call peak MB" for n in rows) + " |",
             "|---|---|" + "---|---|---|" * len(rows)]
    dense = times["dense"]
    for name, by_rows in times.items():
        cells = [f"{by_rows[n][0]:.0f} ({by_rows[n][1]}) | {dense[n][0] / by_rows[n][0]:.2f}x | {by_rows[n][2]:.1f}"
                 for n in rows]
        lines.append(f"| {name} | {by_rows['held'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
