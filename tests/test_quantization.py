"""Quantized values (codecs/quant): the grid, the packing, GPTQ and SparseGPT's joint mode against exact
references, torch's int8 / int4 CPU kernels as the quantized Linear runs them. The codecs' own round trips
and both forms at 8, 4 and 2 bits run in the registry-parametrized tests (conftest.CODEC_SAMPLES)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresscli.codecs.quant import grid, packing
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import Quantizer
from compresscli.codecs.quantized_linear.inference import CompactQuantizedLinear
from compresscli.codecs.quantized_linear.training import QuantizedLinear
from compresscli.kernels import quantized as qk
from compresscli.methods.solvers.column_grid import ColumnGrid
from compresscli.methods.solvers.obs import MaskSpec, sparsegpt


def correlated_inputs(n: int, cols: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Inputs with correlated channels of unequal scales, like activations (so GPTQ's updates matter)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / math.sqrt(cols) + 0.3 * torch.eye(cols)
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) @ mix
    return (x * torch.linspace(0.2, 3.0, cols, dtype=torch.float64)).to(dtype)


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.t() @ x


def gptq(weight, H, spec, keep=None, blocksize=128, clip="minmax", sparsity=0.0):
    """The sweep as the quantize stage runs it: (values on the grid, keep mask, the grid)."""
    g = ColumnGrid(spec, *weight.shape, torch.float32, clip)
    solved, kept = sparsegpt(weight, H, MaskSpec(sparsity), keep, g.blocksize(blocksize), 0.01, "layer", g)
    return solved, kept, g


def dequantized(g: ColumnGrid) -> torch.Tensor:
    return g.quantizer().dequantize(g.codes).double()


# ---------------------------------------------------------------------------------------------- the grid

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8, 7])
def test_round_to_nearest_codes_scales_and_exact_dequantization(bits, symmetric, group_size):
    torch.manual_seed(bits)
    W = torch.randn(6, 29) * torch.rand(6, 1)
    W[2] = 0  # an all-zero row
    W[3, :8] = W[3, :8].abs()  # a group with no negative value
    spec = QuantSpec(bits, group_size, symmetric)
    codes, scales, zeros = grid.rtn(W, spec, torch.float32)
    assert codes.dtype == torch.int8 and codes.shape == W.shape
    assert scales.shape == (6, spec.groups(29)) and (zeros is None) == symmetric and (scales > 0).all()
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    s = grid.expand(scales, spec, 29)
    z = 0 if symmetric else grid.expand(zeros, spec, 29).float()
    values = Quantizer(spec, scales, zeros, 29).dequantize(codes)
    assert torch.equal(values, (codes.float() - z) * s)
    # min-max never clips a symmetric grid; an asymmetric one may clip by half a step more
    assert ((values - W).abs() <= (s / 2 if symmetric else s) * (1 + 1e-6) + 1e-12).all()
    assert torch.equal(values[2], torch.zeros(29))  # zero stays exactly zero


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_codes_are_chosen_against_the_stored_scale(scale_dtype):
    """The scale is rounded to its storage dtype first: the codes are the nearest for the scale the file holds."""
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    codes, scales, _ = grid.rtn(W, QuantSpec(4, 16), scale_dtype)
    assert scales.dtype == scale_dtype
    assert torch.equal(codes.float(), torch.clamp(torch.round(W / scales.float().repeat_interleave(16, 1)), -8, 7))


def test_mse_clip_never_worse_than_the_full_range():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails: clipping pays
    for bits, symmetric in itertools.product((2, 3, 4), (True, False)):
        spec = QuantSpec(bits, 32, symmetric)
        errors = []
        for clip in ("minmax", "mse"):
            quantizer, values = Quantizer.fit(W, spec, clip)
            errors.append((values - W).pow(2).view(64, 4, 32).sum(-1))
        assert (errors[1] <= errors[0] + 1e-6).all()  # the full range is a candidate: per group never worse
        assert errors[1].sum() < 0.97 * errors[0].sum()


def test_fake_quantizer_is_what_the_codes_say_and_passes_gradients():
    """The training form's forward equals the stored codes dequantized; the straight-through estimator passes
    the gradient to weights inside the range and to the scales (LSQ), none to clipped weights."""
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    quantizer, values = Quantizer.fit(W, QuantSpec(3, 16), "mse")
    shadow = nn.Parameter(W.clone())
    out = quantizer(shadow)
    assert torch.equal(out.detach(), quantizer.dequantize(quantizer.codes(shadow)))
    out.sum().backward()
    position = W / grid.expand(quantizer.scales().detach(), quantizer.spec, 32)
    inside, edge = (position > -4) & (position < 3), (position == -4) | (position == 3)  # (the clip's edge: either)
    assert torch.allclose(shadow.grad[~edge], inside[~edge].float()) and not (inside | edge).all()  # mse clipped a few
    assert quantizer.scale_mantissa.grad is not None and quantizer.scale_mantissa.grad.abs().sum() > 0


def test_trained_scales_move_by_the_same_relative_step_whatever_their_size():
    """A scale is a trainable mantissa in [1, 2) times a fixed power of two: AdamW's first step changes a
    scale of 1e-4 and one of 1 by the same fraction (trained directly, the small one would jump by 100%)."""
    W = torch.cat([torch.randn(1, 16) * 1e-4 * 7, torch.randn(1, 16) * 7])
    quantizer, _ = Quantizer.fit(W, QuantSpec(4), "minmax")
    before = quantizer.scales().detach().clone()
    assert ((quantizer.scale_mantissa >= 1) & (quantizer.scale_mantissa < 2)).all()
    optimizer = torch.optim.AdamW(quantizer.parameters(), lr=1e-2)
    quantizer(W).pow(2).sum().backward()
    optimizer.step()
    change = (quantizer.scales().detach() / before - 1).abs().view(-1)
    assert 0 < change.max() < 0.011 and change.min() > 0.004


# ---------------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_any_row_length(bits):
    spec = QuantSpec(bits)
    for cols in [*range(1, 41), 127, 384, 1001]:
        codes = torch.randint(spec.qmin, spec.qmax + 1, (5, cols), dtype=torch.int8)
        codes[0], codes[1] = spec.qmin, spec.qmax
        packed = packing.pack(codes, bits)
        assert packed.shape == (5, packing.row_bytes(cols, bits)) == (5, math.ceil(cols * bits / 8))
        assert torch.equal(packing.unpack(packed, bits, cols), codes)
        if bits < 8:
            used = cols * bits - 8 * (packed.shape[1] - 1)  # bits of the last byte in use: the rest are zero
            assert packed.dtype == torch.uint8 and ((packed[:, -1].int() >> used) == 0).all()


def test_int3_is_dense_and_int4_puts_the_even_column_low():
    word = sum(u << (3 * j) for j, u in enumerate(range(8)))
    assert packing.pack(torch.arange(-4, 4, dtype=torch.int8).view(1, 8), 3).tolist() == \
        [[word & 255, (word >> 8) & 255, word >> 16]]
    assert packing.pack(torch.tensor([[-8, 7, 0]], dtype=torch.int8), 4).tolist() == [[0xF0, 0x08]]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_is_compressed_tensors_pack_to_int32(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    spec = QuantSpec(bits)
    for cols in (32, 64, 96, 100, 37):
        codes = torch.randint(spec.qmin, spec.qmax + 1, (4, cols), dtype=torch.int8)
        theirs = helpers.pack_to_int32(codes, bits).contiguous().view(torch.uint8)  # little-endian bytes
        ours = packing.pack(codes, bits)
        assert torch.equal(theirs[:, :ours.shape[1]], ours) and (theirs[:, ours.shape[1]:] == 0).all()
        if cols * bits % 32 == 0:
            assert torch.equal(ours.view(torch.int32), helpers.pack_to_int32(codes, bits))


# ---------------------------------------------------------------------------------------------- GPTQ

def least_squares_reference(W0, H, spec, pruned=None, percdamp=0.01):
    """Column by column, without Cholesky factors or lazy updates: the columns from i on re-solved by least
    squares given the columns before i at their final values (min (w - W0) Hd (w - W0)^T), then column i
    rounded (code z where pruned); a group's scales from its re-solved values when it starts."""
    rows, cols = W0.shape
    Hd = H + percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    pruned = torch.zeros_like(W0, dtype=torch.bool) if pruned is None else pruned
    g = spec.group(cols)
    Q = torch.zeros_like(W0)
    if spec.group_size is None:
        s, z = grid.choose_scales(W0 * ~pruned, spec, torch.float32)
    for i in range(cols):
        current = W0[:, i:] - (Q[:, :i] - W0[:, :i]) @ Hd[:i, i:] @ torch.linalg.inv(Hd[i:, i:])
        if spec.group_size is not None and i % g == 0:
            s, z = grid.choose_scales(current[:, :g].masked_fill(pruned[:, i:i + g], 0), spec, torch.float32)
        code = torch.where(pruned[:, i], z, torch.round(grid.grid_position(current[:, 0], s, z, spec)))
        Q[:, i] = (code - z) * s
    return Q


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size,blocksize", [(None, 128), (None, 5), (8, 128), (8, 4), (6, 16)])
def test_gptq_equals_a_least_squares_resolve_after_each_column(bits, symmetric, group_size, blocksize):
    """The sweep's lazy block updates through H^-1's Cholesky factor are exactly the greedy column-by-column
    optimum (float64 throughout; groups that do not divide the block, and blocks smaller than a group)."""
    W0 = torch.randn(16, 24, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    H = hessian(correlated_inputs(200, 24, seed=3))
    spec = QuantSpec(bits, group_size, symmetric)
    solved, _, g = gptq(W0, H, spec, blocksize=blocksize)
    assert torch.allclose(solved, dequantized(g), atol=1e-6)  # what it returns is what the codes say
    reference = least_squares_reference(W0, H, spec)
    assert torch.allclose(solved, reference, atol=1e-6), (solved - reference).abs().max()


def test_gptq_with_uncorrelated_inputs_rounds_to_nearest():
    """H diagonal: no error reaches another column, so GPTQ's codes are round to nearest's."""
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    H = torch.diag(torch.rand(24, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5)
    for spec in (QuantSpec(3), QuantSpec(3, 8)):
        _, _, g = gptq(W, H, spec)
        assert torch.equal(g.codes, grid.rtn(W, spec, torch.float32)[0])


def test_gptq_between_the_exhaustive_optimum_and_round_to_nearest():
    """A 2 x 4 layer at 3 bits, per-row scales fixed: every code vector of a row (8^4) scored on the damped
    objective GPTQ minimizes. GPTQ is never below the optimum, finds it in a fair share of rows, and beats
    round to nearest overall."""
    spec = QuantSpec(3)
    codes = torch.tensor(list(itertools.product(range(-4, 4), repeat=4)), dtype=torch.float64)  # (4096, 4)
    hits, total_gptq, total_rtn = 0, 0.0, 0.0
    for seed in range(20):
        W = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        H = hessian(correlated_inputs(64, 4, seed=seed))
        Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(4, dtype=torch.float64)
        loss = lambda Q: torch.einsum("ri,ij,rj->r", Q - W, Hd, Q - W)  # noqa: E731
        s, _ = grid.choose_scales(W, spec, torch.float32)
        optimum = torch.stack([torch.einsum("ki,ij,kj->k", codes * s[r] - W[r], Hd, codes * s[r] - W[r]).min()
                               for r in range(2)])
        solved, _, _ = gptq(W, H, spec)
        rtn_codes, rtn_scales, _ = grid.rtn(W, spec, torch.float32)
        found, rounded = loss(solved), loss(rtn_codes.double() * rtn_scales.double())
        assert (optimum <= found * (1 + 1e-6)).all()
        hits += int(torch.isclose(optimum, found, rtol=1e-6).sum())
        total_gptq, total_rtn = total_gptq + float(found.sum()), total_rtn + float(rounded.sum())
    assert total_gptq < 0.8 * total_rtn and hits >= 10  # of 40 rows


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
def test_prune_and_quantize_in_one_sweep_equals_the_reference(bits, symmetric, group_size):
    """With a 2:4 prior mask and sparsity 0.5 the mask is fixed, so SparseGPT's joint mode must equal the
    column-by-column reference with pruned weights at exactly 0."""
    gen = torch.Generator().manual_seed(bits)
    keep = torch.zeros(16, 24, dtype=torch.bool)
    keep.view(16, 6, 4).scatter_(2, torch.rand(16, 6, 4, generator=gen).argsort(2)[..., :2], True)
    W0 = torch.randn(16, 24, generator=gen, dtype=torch.float64) * keep
    H = hessian(correlated_inputs(200, 24, seed=4))
    spec = QuantSpec(bits, group_size, symmetric)
    solved, kept, g = gptq(W0, H, spec, keep=keep, blocksize=8, sparsity=0.5)
    assert torch.equal(kept, keep) and torch.equal(solved[~keep], torch.zeros(int((~keep).sum()), dtype=torch.float64))
    assert torch.equal(dequantized(g)[~keep], solved[~keep])  # pruned codes decode to exactly 0
    reference = least_squares_reference(W0, H, spec, pruned=~keep)
    assert torch.allclose(solved, reference, atol=1e-6), (solved - reference).abs().max()


def test_joint_sweep_beats_pruning_then_rounding():
    spec = QuantSpec(4, 16)
    totals = [0.0, 0.0]
    for seed in range(4):
        W = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
        X = correlated_inputs(512, 64, seed=seed, dtype=torch.float32)
        pruned, keep = sparsegpt(W, hessian(X), MaskSpec(0.5))
        then_rounded = Quantizer.fit(pruned, spec)[1] * keep
        joint, _, _ = gptq(W, hessian(X), spec, sparsity=0.5)
        totals[0] += float(((joint - W) @ X.t()).pow(2).sum())
        totals[1] += float(((then_rounded - W) @ X.t()).pow(2).sum())
    assert totals[0] < 0.99 * totals[1]


# ---------------------------------------------------------------------------------------------- the kernels

@pytest.mark.skipif(qk.int4_block() is None, reason="torch's int4 CPU kernel layout is not known on this CPU")
@pytest.mark.parametrize("rows", [16, 48, 64, 96, 192, 30, 1000])
def test_int4_layout_is_torchs_and_undoes_exactly(rows):
    """Rows that are not a multiple of 16 (an LM head's vocabulary) are padded with code-0 rows for the kernel."""
    codes = torch.randint(-8, 8, (rows, 256), dtype=torch.int8)
    plain = packing.pack(codes, 4)
    prepared = qk.int4_prepare(plain)
    padded = torch.cat([codes, codes.new_zeros(qk.int4_rows(rows) - rows, 256)])
    assert torch.equal(prepared, torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded.int() + 8, 1))
    assert torch.equal(qk.int4_plain(prepared, rows), plain)


def _quantized_linear(out: int, inputs: int, spec: QuantSpec, dtype: torch.dtype) -> QuantizedLinear:
    torch.manual_seed(out + inputs)
    dense = nn.Linear(inputs, out).to(dtype)
    return QuantizedLinear.from_dense(dense, *Quantizer.fit(dense.weight.detach(), spec))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec,kernel", [(QuantSpec(8), "int8"), (QuantSpec(4, 128), "int4"),
                                         (QuantSpec(4, 64), "int4"), (QuantSpec(3, 64), None)])
@pytest.mark.parametrize("out", [96, 1000])
def test_the_kernels_compute_the_dequantized_linear(dtype, spec, kernel, out):
    """Each path against F.linear on the dequantized weight in float64: float32 to 1e-5; bfloat16 within its
    output rounding. float32 int4 in groups of 128 or less would hold its zeros beyond 5% of the file: the
    layer then dequantizes instead. 1000 rows: the int4 kernel's rows padded to 1008 (and dropped again)."""
    layer = _quantized_linear(out, 256, spec, dtype)
    compact = CompactQuantizedLinear.from_tensors(layer.to_tensors(), layer.codec_params())
    fits = kernel != "int4" or dtype == torch.bfloat16 and spec.group_size == 128
    assert compact.kernel == (kernel if fits else None)
    x = torch.randn(2, 256).to(dtype)  # within every kernel's row limit (kernels/quantized.py KERNEL_MAX_ROWS)
    with torch.no_grad():
        y = compact(x)
        exact = F.linear(x.double(), layer.dense_weight().double(), layer.bias.double())
    # float32 int8 runs the compiled dense int8 kernel, not torch's (plain loops in float32)
    assert compact.last_path == ("cpu-int8" if compact.kernel == "int8" and dtype == torch.float32
                                 else compact.kernel or "dequantize")
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    assert (y.double() - exact).norm() / exact.norm() < tolerance


@pytest.mark.parametrize("inputs", [24, 40, 17])
def test_int8_kernel_is_not_used_where_it_would_read_past_a_row(inputs):
    """torch's bfloat16 int8 kernel reads 16 inputs at a time with aligned loads: for a fan-in that is not a
    multiple of 16 it returned 1e33 (or crashed) when probed, so such layers dequantize instead."""
    layer = _quantized_linear(16, inputs, QuantSpec(8), torch.bfloat16)
    compact = CompactQuantizedLinear.from_tensors(layer.to_tensors(), layer.codec_params())
    x = torch.randn(3, inputs).bfloat16()
    with torch.no_grad():
        assert compact.kernel is None
        torch.testing.assert_close(compact(x), layer(x), rtol=0, atol=0.05)


def test_int8_kernel_gets_an_aligned_input():
    """An input view that starts off a 32-byte boundary is copied before the kernel reads it."""
    layer = _quantized_linear(16, 32, QuantSpec(8), torch.bfloat16)
    compact = CompactQuantizedLinear.from_tensors(layer.to_tensors(), layer.codec_params())
    x = torch.randn(1, 3 * 32 + 1).bfloat16()[:, 1:].contiguous().view(3, 32)
    assert x.data_ptr() % 32 != 0
    with torch.no_grad():
        torch.testing.assert_close(compact(x), layer(x), rtol=0, atol=0.05)
    assert compact.last_path == "int8"
