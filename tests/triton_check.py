"""Every Triton kernel against the PyTorch reference, in float32 and bfloat16 (and float16 for the quantized
kernels), on one device: run on the CPU under TRITON_INTERPRET=1 by tests/test_cuda_kernels.py (a fresh
interpreter per part: the variable is read when triton is imported), and on a real GPU by the gpu-marked test
there and by benchmarks/gpu_check.py.

    python tests/triton_check.py DEVICE [sparse | quantized:BITS | quantized:layers]   # prints "ok N"
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from compresscli.codecs.quant import grid, packing
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import QuantizedValues
from compresscli.codecs.sparse.matrix import CompactSparse
from compresscli.kernels import reference, triton_kernels, triton_quantized, triton_sparse

DTYPES = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative tolerance of the float32-accumulated result
TOLERANCES = {**DTYPES, torch.float16: 2e-3}  # the quantized kernels also take float16
# (rows, cols, input rows): odd sizes (no multiple of any block), a GEMV-shaped and a tiled-shaped batch
QUANT_SHAPES = [(37, 70, 1), (45, 131, 3), (70, 100, 19)]


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = expected.abs().max().item() + 1.0
    error = (got.float().cpu() - expected.float().cpu()).abs().max().item()
    assert got.dtype == dtype and error <= TOLERANCES[dtype] * scale, f"{what}: max error {error:.3g} (scale {scale:.3g})"


def check_row_sparse(device: str) -> int:
    """Bitmask and CSR layers: the GEMV and the decode, empty rows and an all-empty layer included."""
    checked = 0
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for rows, cols, density, n in [(33, 70, 0.3, 1), (40, 300, 0.5, 3), (17, 129, 0.1, 16), (8, 64, 0.0, 2),
                                       (5, 1100, 0.9, 7)]:
            weight = torch.randn(rows, cols, generator=g).to(dtype)
            mask = torch.rand(rows, cols, generator=g) < density
            mask[min(3, rows - 1)] = False
            x, bias = torch.randn(n, cols, generator=g).to(dtype), torch.randn(rows, generator=g).to(dtype)
            expected = F.linear(x.float(), (weight * mask).float(), bias.float())
            for fmt in ("bitmask", "csr"):
                m = CompactSparse.from_masked(weight, mask, fmt).to(device)
                what = f"{fmt} {rows}x{cols} density {density} n={n} {dtype}"
                for b in (bias, None):
                    y = triton_sparse.row_sparse_mm(x.to(device), m.values, m.cols, m.row_ptr,
                                                    None if b is None else b.to(device), rows, cols)
                    _close(y, expected if b is not None else expected - bias.float(), dtype, what)
                dense = triton_sparse.row_sparse_dense(m.values, m.cols, m.row_ptr, rows, cols)
                assert torch.equal(dense.cpu(), weight * mask), f"{what}: decode"
                checked += 3
    return checked


def check_condensed(device: str) -> int:
    """Condensed layers: both launch shapes of the condensed kernel, the row-sparse GEMV and decode of
    fixed-length rows."""
    checked = 0
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        for rows, fan_in, k, n in [(33, 70, 9, 1), (40, 300, 37, 3), (40, 300, 37, 70), (20, 50, 50, 2)]:
            idx = torch.rand(rows, fan_in, generator=g).topk(k, dim=1).indices.sort(1).values.to(torch.int16)
            v, b = torch.randn(rows, k, generator=g).to(dtype), torch.randn(rows, generator=g).to(dtype)
            x = torch.randn(n, fan_in, generator=g).to(dtype)
            expected = reference.gather_mm(x.float(), v.float(), idx, b.float())
            what = f"condensed {rows}x{fan_in} k={k} n={n} {dtype}"
            xd, vd, idxd, bd = (t.to(device) for t in (x, v, idx, b))
            for tiled in (False, True):
                _close(triton_kernels.condensed_mm(xd, vd, idxd, bd, tiled), expected, dtype, f"{what} tiled={tiled}")
            _close(triton_sparse.row_sparse_mm(xd, vd, idxd, None, bd, rows, fan_in, k), expected, dtype, what)
            dense = triton_sparse.row_sparse_dense(vd, idxd, None, rows, fan_in, k)
            assert torch.equal(dense.cpu(), reference.scatter_dense(v, idx, fan_in)), f"{what}: decode"
            checked += 4
    return checked


def check_quantized(device: str, bits: int) -> int:
    """Quantized dense weights at `bits`: both kernels against the PyTorch dequantized weight (float32
    product), symmetric and asymmetric, one scale a row and groups (a short last group included), float32 /
    bfloat16 / float16, with and without bias; the codes and scales exactly as the file holds them. Not in
    the interpreter: the tiled kernel in bfloat16 (its tl.dot multiplies bfloat16's raw bits as integers;
    the gemv kernel checks the same dequantization in bfloat16, the tiled one its tiles in float32/float16)."""
    checked = 0
    g = torch.Generator().manual_seed(bits)
    for symmetric in (True, False):
        for group_size in (None, 24):  # 24: a short last group at every width below
            for rows, cols, n in QUANT_SHAPES:
                spec = QuantSpec(bits, group_size, symmetric)
                codes, scales, zeros = grid.rtn(torch.randn(rows, cols, generator=g) / cols ** 0.5, spec,
                                                torch.float32)
                stored = QuantizedValues(spec, packing.pack(codes, bits), scales, zeros, (rows, cols), cols)
                weight = stored.dequantize(torch.float32)
                bias = torch.randn(rows, generator=g)
                for dtype in TOLERANCES:
                    x = torch.randn(n, cols, generator=g).to(dtype)
                    b = bias.to(dtype) if dtype != torch.float16 else None
                    expected = F.linear(x.float(), weight, None if b is None else b.float())
                    args = [t.to(device) if t is not None else None
                            for t in (x, stored.codes, scales.to(dtype), zeros)]
                    for tiled in (False, True):
                        if tiled and dtype == torch.bfloat16 and device == "cpu":
                            continue  # the interpreter's tl.dot multiplies bfloat16's raw bits (numpy has no bf16)
                        y = triton_quantized.quantized_mm(*args, bits, spec.group(cols),
                                                          None if b is None else b.to(device), tiled)
                        what = f"int{bits} {spec} {rows}x{cols} n={n} {dtype} tiled={tiled}"
                        _close(y, expected, dtype, what)
                        checked += 1
    return checked


def check_quantized_layers(device: str) -> int:
    """Every quantized_linear sample layer (conftest's, the int4 CPU kernel's padded rows included): both
    kernels on what its file holds give what the layer computes on the CPU, in float32 and bfloat16."""
    from conftest import codec_samples

    from compresscli.codecs.forms import to_inference_

    checked = 0
    for sample in codec_samples("quantized_linear"):
        for dtype in DTYPES:
            layer = to_inference_(torch.nn.Sequential(sample.make()[0]))[0].to(dtype)
            x = sample.input(dtype)
            with torch.no_grad():
                expected = layer(x).float()
            held = {k: v.to(device) for k, v in layer.to_tensors().items()}
            for tiled in (False, True) if dtype == torch.float32 or device != "cpu" else (False,):
                y = triton_quantized.quantized_mm(x.to(device), held["weight.codes"], held["weight.scales"],
                                                  held.get("weight.zeros"), layer.spec.bits,
                                                  layer.spec.group(layer.in_features), held.get("bias"), tiled)
                _close(y, expected, dtype, f"{layer!r} {dtype} tiled={tiled}")
                checked += 1
    return checked


def main(device: str, only: str | None = None) -> int:
    """Every check, or `only` one part: "sparse" (row-sparse and condensed), "quantized:BITS" or
    "quantized:layers"."""
    if only == "sparse":
        return check_row_sparse(device) + check_condensed(device)
    if only == "quantized:layers":
        return check_quantized_layers(device)
    if only:
        return check_quantized(device, int(only.split(":")[1]))
    return sum(main(device, part) for part in ("sparse", "quantized:8", "quantized:4", "quantized:3", "quantized:2",
                                               "quantized:layers"))


if __name__ == "__main__":
    print(f"ok {main(sys.argv[1] if len(sys.argv) > 1 else 'cpu', sys.argv[2] if len(sys.argv) > 2 else None)}")
