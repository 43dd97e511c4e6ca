"""The compiled row-sparse and RPS kernels against PyTorch, on every code path: bitmask words and int16 /
int32 indices, float32 and bfloat16, one input row and tiles of several, empty and full rows; the AVX2
build (COMPRESSCLI_NO_AVX512) and the pure-PyTorch fallbacks (COMPRESSCLI_NO_CPU_KERNEL) in processes of
their own. The RPS kernel must give the training form's weight bit for bit."""
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

SHAPES = [(256, 64, 17, 0.1), (96, 384, 16, 0.5), (40, 1536, 1, 0.1), (100, 130, 40, 0.3), (64, 200, 70, 0.05),
          (33, 70, 9, 0.0), (33, 70, 9, 1.0), (8, 40000, 3, 0.01)]  # (rows, cols, input rows, density)
PLACEMENTS = [("randomfold", "linear", (37, 50)), ("roast", "linear", (70, 45)), ("roast", "conv", (20, 3, 3, 3)),
              ("roast", "embedding", (40, 70)), ("randomfold", "embedding", (40, 70)), ("randomfold", "conv", (8, 4, 3, 3))]


def check_row_sparse_products() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, cols, n, density in SHAPES:
            mask = torch.rand(rows, cols) < density
            mask[0] = False  # an empty row
            weight = (torch.randn(rows, cols) * mask).to(dtype)
            x, bias = torch.randn(n, cols).to(dtype), torch.randn(rows).to(dtype)
            expected = F.linear(x.float(), weight.float(), bias.float())
            for fmt in ("bitmask", "csr"):
                matrix = CompactSparse.from_masked(weight, mask, fmt)
                assert torch.equal(matrix.dense(), weight) and torch.equal(matrix.mask(), mask)
                with kernels.force_path("cpu"):
                    got, path = matrix.mm(x, bias)
                assert path == "cpu" and got.dtype == dtype
                scale = max(1.0, expected.abs().max().item())
                tolerance = 1e-5 if dtype == torch.float32 else 2e-2
                assert (got.float() - expected).abs().max().item() <= tolerance * scale, (dtype, rows, cols, n, fmt)


def check_rps_weights() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
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


needs_kernel = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the CPU kernels cannot be built")


@needs_kernel
def test_row_sparse_products_match_pytorch():
    check_row_sparse_products()


@needs_kernel
def test_rps_kernel_gives_the_training_forms_weights():
    check_rps_weights()


@needs_kernel
def test_avx2_build_too():
    """The same checks on the library built without AVX-512 (byte-table extraction, scalar hashing)."""
    code = "from test_sparse_kernels import *; check_row_sparse_products(); check_rps_weights()"
    env = {**os.environ, cpu.NO_AVX512_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


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


def test_dispatch_decodes_where_a_dense_product_wins():
    """Many input rows at half density: the weight is decoded for the call; few rows, or sparse: the kernel."""
    from compresscli.kernels.dispatch import choose_sparse_path

    cpu_device = torch.device("cpu")
    runnable = cpu.available()
    assert choose_sparse_path(cpu_device, torch.float32, 1024, 0.5, False) == "dense"
    assert choose_sparse_path(cpu_device, torch.float32, 16, 0.5, False) == ("cpu" if runnable else "dense")
    assert choose_sparse_path(cpu_device, torch.float32, 1024, 0.1, False) == ("cpu" if runnable else "dense")
    assert choose_sparse_path(cpu_device, torch.float32, 16, 0.1, True) == "dense"  # gradients: autograd's path
    assert choose_sparse_path(cpu_device, torch.float16, 16, 0.1, False) == "dense"  # no float16 kernel
