"""The int8 row-sparse kernels (issue 21, item 4): bitmask and CSR layers whose kept values are int8 codes with
scales per row or per group of columns, in every activation dtype, at 1-8 input rows (the compiled kernel) and
many (decode + GEMM), against the exactly dequantized dense product; the layers route there with no per-call
dequantization, and sub-byte or asymmetric values keep the dequantizing fallback.

Tolerance, relative to bound = |x| @ |W|^T + |y| (float64): the kernel forms each code * scale exactly in float32
(8 + at most 11 significant bits for bfloat16 / float16 scales) and accumulates in float32, then rounds y once
to the activation dtype (eps / 2); decode + GEMM also rounds each weight once to that dtype (eps / 2 of its
term). So 2 eps for 16-bit activations (float32 accumulation adds ~k / 64 * 2^-24, far below); float32
activations are bounded by the accumulation itself, ~(k / 64 + log2 64) eps for the kernel's 64 partial sums
over k <= 600 terms here: 16 eps."""
from __future__ import annotations

import pytest
import torch

from compresscli import kernels
from compresscli.codecs.quant.grid import QuantSpec, rtn
from compresscli.codecs.quant.values import QuantizedValues
from compresscli.codecs.sparse import encoding
from compresscli.codecs.sparse.matrix import CompactSparse, _row_offsets, pack_row_words
from compresscli.kernels import cpu
from conftest import check_on_isa_build

TOLERANCE_EPS = {torch.float32: 16, torch.bfloat16: 2, torch.float16: 2}
SHAPES = [(37, 300, 0.4), (64, 130, 0.9), (20, 600, 0.05)]  # (rows, cols, density): odd widths, dense and sparse
GROUPS = [None, 128, 64, 32, 24]  # per row; whole mask words (bf16 dot), 16-column chunks and inside them; short last groups

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the CPU kernels cannot be built")


def int8_matrix(rows: int, cols: int, density: float, group: int | None, fmt: str, scale_dtype: torch.dtype,
                bits: int = 8, symmetric: bool = True, seed: int = 0) -> tuple[CompactSparse, torch.Tensor]:
    """A sparse matrix with quantized values (an empty first row, a full last one) and its exact dense weight
    (float64: codes times scales, zero points subtracted)."""
    torch.manual_seed(seed)
    weight = torch.randn(rows, cols) / cols ** 0.5
    mask = torch.rand(rows, cols) < density
    mask[0], mask[-1] = False, True
    spec = QuantSpec(bits, group, symmetric)
    codes, scales, zeros = rtn(weight, spec, scale_dtype)
    from compresscli.codecs.quant import packing

    kept = codes[mask].view(1, -1)
    values = QuantizedValues(spec, packing.pack(kept, bits), scales, zeros, (1, kept.shape[1]), cols)
    structure = pack_row_words(mask) if fmt == "bitmask" else mask.nonzero()[:, 1].to(encoding.index_dtype(cols))
    matrix = CompactSparse(values, structure, _row_offsets(mask), (rows, cols))
    g = spec.group(cols)
    q = codes.double() - (0 if zeros is None else zeros.double().repeat_interleave(g, 1)[:, :cols])
    exact = q * scales.double().repeat_interleave(g, 1)[:, :cols] * mask
    return matrix, exact


def check_products(dtypes=tuple(cpu.DTYPES), shapes=tuple(SHAPES), groups=tuple(GROUPS)) -> None:
    for dtype in dtypes:
        for rows, cols, density in shapes:
            for group in groups:
                for fmt in ("bitmask", "csr"):
                    for scale_dtype in sorted({dtype, torch.bfloat16}, key=str):
                        matrix, exact = int8_matrix(rows, cols, density, group, fmt, scale_dtype)
                        bias = torch.randn(rows).to(dtype)
                        for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 40):
                            x = torch.randn(n, cols).to(dtype)
                            with torch.no_grad():
                                got, path = matrix.mm(x, bias)
                            assert path == ("cpu-int8" if n <= 8 else "decoded-int8") and got.dtype == dtype
                            check_close(got, x, exact, bias, (dtype, rows, cols, group, fmt, scale_dtype, n))


def check_close(got: torch.Tensor, x: torch.Tensor, exact: torch.Tensor, bias: torch.Tensor, what) -> None:
    expected = x.double() @ exact.T + bias.double()
    bound = x.double().abs() @ exact.abs().T + expected.abs() + bias.double().abs()
    error = ((got.double() - expected).abs() / bound.clamp_min(1e-30)).max().item()
    assert error <= TOLERANCE_EPS[got.dtype] * torch.finfo(got.dtype).eps, (what, error)


@needs_kernel
def test_int8_products_equal_the_dequantized_product():
    check_products()


@needs_kernel
@pytest.mark.parametrize("forced", ["cpu", "decoded"])
@pytest.mark.parametrize("fmt", ["bitmask", "csr"])
def test_forced_paths_at_any_row_count(forced, fmt):
    """The kernel past 8 rows (groups of 8) and decode + GEMM at one row give the same product."""
    matrix, exact = int8_matrix(50, 200, 0.5, 64, fmt, torch.bfloat16)
    bias = torch.randn(50).to(torch.bfloat16)
    for n in (1, 8, 21):
        x = torch.randn(n, 200).to(torch.bfloat16)
        with kernels.force_path(forced), torch.no_grad():
            got, path = matrix.mm(x, bias)
        assert path == f"{forced}-int8"
        check_close(got, x, exact, bias, (forced, fmt, n))


@pytest.mark.parametrize("bits,symmetric", [(4, True), (2, True), (8, False)])
def test_sub_byte_and_asymmetric_values_keep_the_dequantizing_path(bits, symmetric):
    matrix, exact = int8_matrix(30, 100, 0.5, None, "bitmask", torch.float32, bits=bits, symmetric=symmetric)
    x = torch.randn(3, 100)
    with torch.no_grad():
        got, path = matrix.mm(x, None)
    assert not path.endswith("-int8")
    check_close(got, x, exact, torch.zeros(30), (bits, symmetric))


@needs_kernel
@pytest.mark.parametrize("group_size", [None, 128])
def test_a_magnitude_then_int8_layer_runs_the_kernel_without_dequantizing(group_size, monkeypatch):
    """The inference form a recipe writes (magnitude 50%, then `quantize` int8 rtn) reaches the int8 kernel
    at 1-8 rows and decode + GEMM past them, never dequantizing its values for a call, and holds no more
    than before (inference_extra_bytes unchanged)."""
    from torch import nn

    from compresscli import MagnitudeConfig, compress_
    from compresscli.codecs.forms import to_inference_
    from compresscli.methods.quantize import QuantizeConfig

    torch.manual_seed(0)
    dense = nn.Linear(256, 96).to(torch.bfloat16)
    holder = nn.Sequential(dense)
    compress_(holder, MagnitudeConfig(sparsity=0.5, scope="layer"), None)
    compress_(holder, QuantizeConfig(bits=8, group_size=group_size, solver="rtn"), None)
    layer = to_inference_(holder)[0]
    x = torch.randn(2, 5, 256).to(torch.bfloat16)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x.double(), layer.matrix.dense().double(), layer.bias.double())

    def refuse(*_args, **_kwargs):
        raise AssertionError("values dequantized for a call")

    monkeypatch.setattr(QuantizedValues, "dequantize", refuse)
    for rows, path in ((slice(0, 1), "cpu-int8"), (slice(0, 5), "decoded-int8")):  # 1 row; 2 x 5 rows
        with torch.no_grad():
            got = layer(x[:, rows] if path == "decoded-int8" else x[0, rows])
        assert layer.last_path == path
        want = expected[:, rows] if path == "decoded-int8" else expected[0, rows]
        assert (got.double() - want).abs().max().item() <= 2 ** -7 * want.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_builds_below_the_best_isa_too(isa):
    """The scalar loop (AVX2 and scalar builds) and AVX-512 without VBMI2 (16-column expansion), in processes of
    their own."""
    check_on_isa_build(isa, "import torch; from test_sparse_int8 import *; "
                            "check_products(shapes=[(37, 300, 0.4), (20, 600, 0.05)], groups=[None, 24])")
