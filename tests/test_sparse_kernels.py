"""The compiled row-sparse and RPS kernels against PyTorch, on every code path: bitmask words and int16 /
int32 indices, float32, bfloat16 and float16, one input row, a few (1-8, the decode rows; up to 32, the
AMX tiles) and many (decode + GEMM), empty and full rows; the builds below the best ISA
($COMPRESSCLI_CPU_ISA) and the pure-PyTorch fallbacks (COMPRESSCLI_NO_CPU_KERNEL) in processes of their
own. The RPS kernel must give the training form's weight bit for bit; the row-major product (FiPS's projection
onto U) must match x @ M. Dispatch must be total: every
structure and dtype has a row limit, measured (kernels/cpu_thresholds.py) or the documented fallback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from compresscli import kernels
from compresscli.kernels import cpu
from compresscli.codecs.sparse.matrix import CompactSparse
from compresscli.codecs.rps.hashing import Placement
from conftest import check_on_isa_build

SHAPES = [(256, 64, 17, 0.1), (96, 384, 16, 0.5), (40, 1536, 1, 0.1), (100, 130, 40, 0.3), (64, 200, 70, 0.05),
          (33, 70, 9, 0.0), (33, 70, 9, 1.0), (8, 40000, 3, 0.01)]  # (rows, cols, input rows, density)
PLACEMENTS = [("randomfold", "linear", (37, 50)), ("roast", "linear", (70, 45)), ("roast", "conv", (20, 3, 3, 3)),
              ("roast", "embedding", (40, 70)), ("randomfold", "embedding", (40, 70)), ("randomfold", "conv", (8, 4, 3, 3))]


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative to the largest output


def check_row_sparse_products() -> None:
    torch.manual_seed(0)
    for dtype in cpu.DTYPES:
        for rows, cols, n_shape, density in SHAPES:
            mask = torch.rand(rows, cols) < density
            mask[0] = False  # an empty row
            weight = (torch.randn(rows, cols) * mask).to(dtype)
            bias = torch.randn(rows).to(dtype)
            for n in sorted({1, 2, 8, 24, n_shape, 300}):
                x = torch.randn(n, cols).to(dtype)
                expected = F.linear(x.float(), weight.float(), bias.float())
                for fmt in ("bitmask", "csr"):
                    matrix = CompactSparse.from_masked(weight, mask, fmt)
                    assert torch.equal(matrix.dense(), weight) and torch.equal(matrix.mask(), mask)
                    for forced in ("cpu", "decoded"):
                        with kernels.force_path(forced), torch.no_grad():
                            got, path = matrix.mm(x, bias)
                        assert path == forced and got.dtype == dtype
                        scale = max(1.0, expected.abs().max().item())
                        error = (got.float() - expected).abs().max().item()
                        assert error <= TOLERANCE[dtype] * scale, (dtype, rows, cols, n, fmt, forced, error)


def check_condensed_and_rps_products() -> None:
    """Constant fan-in rows (int16 indices, no row pointer) and RPS products, on both compiled paths."""
    from compresscli.kernels import dispatch

    torch.manual_seed(0)
    rows, cols, k = 70, 300, 40
    placement = Placement(2000, "randomfold", 7, 0, 0, "linear", 8, 16, 12)
    spec = torch.tensor(placement.kernel_spec((rows, cols)), dtype=torch.int64)
    for dtype in cpu.DTYPES:
        indices = torch.rand(rows, cols).topk(k, dim=1).indices.sort(1).values.to(torch.int16)
        values, bias = (torch.randn(rows, k) / k ** 0.5).to(dtype), torch.randn(rows).to(dtype)
        dense = torch.zeros(rows, cols).scatter(1, indices.long(), values.float())
        memory = (torch.randn(2000) / cols ** 0.5).to(dtype)
        rps_dense = cpu.rps_weight(memory, spec, 0.5, 0, rows, cols).float()
        for n in (1, 2, 8, 24, 300):
            x = torch.randn(n, cols).to(dtype)
            for forced in ("cpu", "decoded"):
                with kernels.force_path(forced), torch.no_grad():
                    products = {"condensed": (dispatch.condensed_mm(x, values, indices, bias, cols), dense),
                                "rps": (dispatch.rps_mm(x, memory, spec, 0.5, bias, rows, cols), rps_dense)}
                for name, ((got, path), weight) in products.items():
                    expected = F.linear(x.float(), weight, bias.float())
                    error = (got.float() - expected).abs().max().item()
                    assert path == forced and got.dtype == dtype
                    assert error <= TOLERANCE[dtype] * max(1.0, expected.abs().max().item()), (name, dtype, n, forced)


def check_rps_weights() -> None:
    torch.manual_seed(0)
    for dtype in cpu.DTYPES:
        for mapper, layout, shape in PLACEMENTS:
            for size, offset, index in [(1000, 0, 0), (5000, 12345, 3), (70000, 2**40 + 5, 2)]:
                placement = Placement(size, mapper, 7, offset, index, layout, 8, 16, 12)
                memory, scale = torch.randn(size).to(dtype), torch.tensor(0.37, dtype=dtype)
                slots, signs = placement.locate(shape)
                expected = memory[slots] * (signs * scale)
                spec = torch.tensor(placement.kernel_spec(shape), dtype=torch.int64)
                width = expected[0].numel()
                got = cpu.rps_weight(memory, spec, float(scale), 0, shape[0], width).view(shape)
                assert torch.equal(got, expected), (dtype, mapper, layout, shape, size)
                part = cpu.rps_weight(memory, spec, float(scale), 2, 5, width).view(3, *shape[1:])
                assert torch.equal(part, expected[2:5])


def check_row_major_products() -> None:
    """cpu.row_major_mm (x @ M, M row-major) at 1-8 input rows, shapes whose rows are not a multiple of the
    kernel's 4 nor its columns of 16, and fewer rows of M than threads x 4."""
    torch.manual_seed(0)
    for dtype in cpu.DTYPES:
        for k, r in [(3, 5), (7, 33), (64, 16), (130, 95), (513, 300)]:
            m = (torch.randn(k, r) / k ** 0.5).to(dtype)
            for n in range(1, cpu.ROW_MAJOR_MAX_ROWS + 1):
                x = torch.randn(n, k).to(dtype)
                expected = x.double() @ m.double()
                got = cpu.row_major_mm(x, m)
                error = (got.double() - expected).abs().max().item()
                assert got.dtype == dtype and got.shape == (n, r)
                assert error <= TOLERANCE[dtype] * max(1.0, expected.abs().max().item()), (dtype, k, r, n, error)
    with pytest.raises(RuntimeError, match="9 rows"):
        cpu.row_major_mm(torch.randn(9, 4), torch.randn(4, 3))


needs_kernel = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the CPU kernels cannot be built")


@needs_kernel
def test_row_sparse_products_match_pytorch():
    check_row_sparse_products()


@needs_kernel
def test_condensed_and_rps_products_match_pytorch():
    check_condensed_and_rps_products()


@needs_kernel
def test_rps_kernel_gives_the_training_forms_weights():
    check_rps_weights()


@needs_kernel
def test_row_major_products_match_pytorch():
    check_row_major_products()


@needs_kernel
def test_row_major_dispatch_takes_the_kernel_only_where_it_was_measured_faster(monkeypatch):
    """The kernel for 16-bit x at 1-8 rows and float32 at 2-8 (dispatch.ROW_MAJOR_KERNEL_ROWS); torch's x @ M
    for more rows, with autograd, or float32 at one row; the same values either way."""
    from compresscli.kernels import dispatch

    calls = []
    real = cpu.row_major_mm
    monkeypatch.setattr(cpu, "row_major_mm", lambda x, m: calls.append((x.dtype, x.shape[0])) or real(x, m))
    for dtype, n, kernel in [(torch.bfloat16, 1, True), (torch.float16, 8, True), (torch.float32, 2, True),
                             (torch.float32, 1, False), (torch.bfloat16, 9, False)]:
        x, m = torch.randn(n, 20).to(dtype), torch.randn(20, 30).to(dtype)
        calls.clear()
        with torch.no_grad():
            y = dispatch.row_major_mm(x, m)
        assert calls == ([(dtype, n)] if kernel else [])
        assert torch.allclose(y.double(), x.double() @ m.double(), rtol=0, atol=TOLERANCE[dtype] * 20)
    m = torch.randn(20, 30, requires_grad=True)
    calls.clear()
    y = dispatch.row_major_mm(torch.randn(2, 20), m)
    assert calls == [] and y.requires_grad


@needs_kernel
@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512-bf16"])
def test_builds_below_the_best_isa_too(isa):
    """The same checks on the library built for fewer instruction sets (the AVX2 fallback, AVX-512 without
    vdpbf16ps / vpexpandw, and without AMX), each in a process of its own."""
    check_on_isa_build(isa, "from test_sparse_kernels import *; check_row_sparse_products(); "
                            "check_condensed_and_rps_products(); check_rps_weights(); check_row_major_products()")


def test_without_the_kernels_every_inference_form_still_runs(tmp_path):
    """No compiler: the inference forms decode for the call in PyTorch and give the same outputs."""
    code = ("import torch, test_forms as t\n"
            "from compresscli.kernels import cpu\n"
            "assert not cpu.available()\n"
            "for codec in t.CODECS.names():\n"
            "    t.test_conversion_is_lossless_both_ways(codec, torch.float32)\n")
    env = {**os.environ, cpu.DISABLE_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


STRUCTURES = ("bitmask", "csr", "condensed", "rps")


@pytest.mark.parametrize("dtype", list(cpu.DTYPES))
def test_every_dtype_has_a_measured_row_limit(dtype):
    """The table the bench generated covers every structure and dtype the kernels take (no fallback)."""
    from compresscli.kernels import cpu_thresholds

    name = str(dtype).removeprefix("torch.")
    for structure in STRUCTURES:
        assert cpu_thresholds.KERNEL_MAX_ROWS.get(structure, {}).get(name), (structure, name)


def test_an_unmeasured_structure_falls_back_without_error(monkeypatch):
    from compresscli.kernels import cpu_thresholds, dispatch

    monkeypatch.setattr(cpu_thresholds, "KERNEL_MAX_ROWS", {"bitmask": {"bfloat16": {0.5: {"large": 64}}}})
    for dtype in cpu.DTYPES:
        for structure in STRUCTURES:
            limit = dispatch.cpu_kernel_max_rows(structure, dtype, 0.5, 1000)
            expected = 64 if (structure, dtype) == ("bitmask", torch.bfloat16) else dispatch.UNMEASURED_MAX_ROWS
            assert limit == expected, (structure, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", list(cpu.DTYPES))
@pytest.mark.parametrize("fmt", ["bitmask", "csr"])
def test_every_dtype_reaches_the_compiled_path_where_the_table_says(dtype, fmt):
    """A real layer at a Llama MLP shape: the kernel at batch 1 and up to the measured limit, decode + GEMM past
    it, PyTorch's dense product with gradients."""
    from compresscli.kernels import dispatch

    rows, cols, density = 2048, 5632, 0.5 if fmt == "bitmask" else 0.05
    mask = torch.rand(rows, cols) < density
    matrix = CompactSparse.from_masked(torch.randn(rows, cols).to(dtype), mask, fmt)
    limit = dispatch.cpu_kernel_max_rows(fmt, dtype, matrix.values.numel() / (rows * cols), rows * cols)
    for n, expected in ((1, "cpu"), (limit, "cpu"), (limit + 1, "decoded")):
        with torch.no_grad():
            assert matrix.mm(torch.randn(n, cols).to(dtype))[1] == expected, (n, limit)
    assert dispatch.choose_sparse_path(torch.device("cpu"), dtype, 1, density, True, fmt, rows * cols) == "dense"
