"""The compiled decoders of quantized dense weights (kernels/cpu_source.py `q8_rows_decode`, `q4_blocks_decode_t`)
and the many-rows path they feed (kernels/quantized.py `decoded_int8_mm` / `decoded_int4_mm`, decode + GEMM);
the compiled dense int8 product for few rows (`dense_q8_mm`).

A decoder computes exactly what QuantizedValues.dequantize computes (code * scale in float32, rounded to the
scales' dtype, then to the output's), so its tiles are compared for equality, in every scales dtype x output
dtype, at odd row counts, windows of rows that start and end inside int4 blocks, and int4 weights whose held
rows are padded; the builds below the best ISA (the scalar loops) in a process of their own.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresscli.codecs.quant import packing
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import QuantizedValues, Quantizer
from compresscli.codecs.quantized_linear.inference import CompactQuantizedLinear
from compresscli.codecs.quantized_linear.training import QuantizedLinear
from compresscli.kernels import cpu, decoded
from compresscli.kernels import quantized as qk
from conftest import check_on_isa_build, codec_samples

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="no compiled CPU kernels here")
DTYPES = list(cpu.DTYPES)


def _compact(out: int, inputs: int, spec: QuantSpec, dtype: torch.dtype, bias: bool = True) -> CompactQuantizedLinear:
    torch.manual_seed(out * 7 + inputs)
    dense = nn.Linear(inputs, out, bias=bias)
    nn.init.normal_(dense.weight, std=inputs ** -0.5)  # the trained weight scale
    dense = dense.to(dtype)
    layer = QuantizedLinear.from_dense(dense, *Quantizer.fit(dense.weight.detach(), spec))
    return CompactQuantizedLinear.from_tensors(layer.to_tensors(), layer.codec_params())


def _windows(rows: int) -> list[tuple[int, int]]:
    """Row ranges a tiled decode asks for: the whole weight, and ranges starting / ending inside 64-row blocks."""
    return sorted({(0, rows), (0, min(rows, 37)), (min(5, rows - 1), min(rows, 77)), (rows // 2, rows),
                   (min(64, rows - 1), min(rows, 130))})


def check_int8_rows(dtypes=DTYPES) -> None:
    for scale_dtype in dtypes:
        for rows, cols, group in ((37, 48, None), (33, 40, 8), (5, 50, 24), (200, 96, 32)):
            spec = QuantSpec(8, group)
            codes = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
            scales = (torch.rand(rows, spec.groups(cols)) * 0.02 + 1e-4).to(scale_dtype)
            values = QuantizedValues(spec, codes, scales, None, (rows, cols), cols)
            for out_dtype in dtypes:
                expected = values.dequantize().to(out_dtype)  # what dequantized_mm multiplies
                for r0, r1 in _windows(rows):
                    out = torch.full((r1 - r0, cols), float("nan"), dtype=out_dtype)
                    got = cpu.int8_rows(codes, scales, spec.group(cols), r0, r1, out)
                    assert torch.equal(got, expected[r0:r1]), (scale_dtype, out_dtype, rows, cols, group, r0, r1)


def check_int4_blocks(dtypes=DTYPES) -> None:
    """The layout torch's int4 kernel reads here (qk.int4_prepare) and the other block size torch uses (32 rows,
    its AVX2 layout), with padded rows (200 -> 208 held: 3 blocks of 64 and 16 rows paired) and a group of 32."""
    for scale_dtype in dtypes:
        for rows, cols, group in ((200, 256, 128), (96, 64, 32), (1000, 128, 64), (16, 64, 64)):
            plain_codes = torch.randint(-8, 8, (rows, cols), dtype=torch.int8)
            scales = (torch.rand(rows, cols // group) * 0.02 + 1e-4).to(scale_dtype)
            spec = QuantSpec(4, group)
            stored = packing.pack(plain_codes, 4)
            expected_f32 = QuantizedValues(spec, stored, scales, None, (rows, cols), cols).dequantize()
            held = qk.int4_rows(rows)
            nibbles = torch.cat([plain_codes + 8, torch.full((held - rows, cols), 8, dtype=torch.int8)]).to(torch.uint8)
            sz = qk.int4_scales_and_zeros(scales)
            for block in {qk.int4_block() or 64, 32}:
                packed = qk._to_blocks(nibbles, block)
                for out_dtype in dtypes:
                    expected = expected_f32.to(out_dtype)
                    for r0, r1 in _windows(rows):
                        out = torch.full((cols, r1 - r0), float("nan"), dtype=out_dtype)
                        got = cpu.int4_block_rows_t(packed, sz, group, block, r0, r1, out)
                        assert torch.equal(got.t(), expected[r0:r1]), (scale_dtype, out_dtype, rows, block, r0, r1)


def check_dense_q8(dtypes=DTYPES) -> None:
    """cpu.dense_q8_mm (1-8 input rows) against the float64 product with code * scale: per row (also
    where the row is not a multiple of 16 columns) and groups of 16 / 32 / 64, every activation x scales dtype."""
    for scale_dtype in dtypes:
        for rows, cols, group in ((37, 48, None), (5, 50, None), (33, 64, 16), (200, 96, 32), (17, 320, 64)):
            spec = QuantSpec(8, group)
            codes = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
            scales = (torch.rand(rows, spec.groups(cols)) * 0.02 + 1e-4).to(scale_dtype)
            # code * scale exactly (the kernel scales each group's float32 sum; dequantize() rounds every weight
            # to the scales' dtype first)
            weight = codes.double() * scales.double().repeat_interleave(spec.group(cols), 1)[:, :cols]
            for dtype in dtypes:
                bias = torch.randn(rows).to(dtype)
                for n in range(1, cpu.DENSE_Q8_MAX_ROWS + 1):
                    x = torch.randn(n, cols).to(dtype)
                    expected = x.double() @ weight.t() + bias.double()
                    got = cpu.dense_q8_mm(x, codes, scales, spec.group(cols), bias)
                    error = ((got.double() - expected).abs().max() / expected.abs().max()).item()
                    assert got.dtype == dtype and error < TOLERANCE[dtype], (scale_dtype, dtype, rows, cols, group, n)
    with pytest.raises(RuntimeError, match="group 24"):
        cpu.dense_q8_mm(torch.randn(1, 48), torch.zeros(3, 48, dtype=torch.int8), torch.ones(3, 2), 24, None)


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # of the largest output


@needs_kernel
def test_dense_int8_kernel_matches_the_dequantized_product():
    check_dense_q8()


@needs_kernel
def test_int8_decoder_equals_the_pytorch_dequantize():
    check_int8_rows()


@needs_kernel
def test_int4_decoder_equals_the_pytorch_dequantize():
    check_int4_blocks()


@needs_kernel
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_decoders_below_the_best_isa_too(isa):
    """The same checks on the scalar loops (the AVX2 build has no vector path of its own for these), the dense
    int8 kernel's included."""
    check_on_isa_build(isa, "import torch; from test_quantized_decode import *; check_int8_rows([torch.bfloat16, "
                            "torch.float32]); check_int4_blocks([torch.bfloat16, torch.float16]); check_dense_q8()")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(8, 32), QuantSpec(4, 128)], ids=str)
@pytest.mark.parametrize("out", [96, 1000, 37])
def test_many_rows_take_the_decoded_path(dtype, spec, out):
    """Past the kernel's row limit a decodable layer runs decode + GEMM (`last_path` "decoded") and gives what
    the old path (the weight dequantized in PyTorch, then F.linear) gives; others still dequantize."""
    layer = _compact(out, 256, spec, dtype)
    n = 300  # above every KERNEL_MAX_ROWS
    x = torch.randn(n, 256).to(dtype)
    with torch.no_grad():
        y = layer(x)
        old = qk.dequantized_mm(x, layer.dense_weight(), layer.bias.to(dtype))
    decodable = spec.bits == 8 or layer.kernel == "int4"
    assert layer.last_path == ("decoded" if decodable else "dequantize")
    # the same weight, the same GEMM library: equal but for the GEMM's blocking of a transposed operand
    torch.testing.assert_close(y, old, rtol=0, atol=0 if dtype == torch.float32 or spec.bits == 8 else 1e-2)


@needs_kernel
def test_tiled_decode_matches_the_whole_weight(monkeypatch):
    """A weight larger than decoded.TILE_BYTES runs tile by tile (tiles of 24 rows here: int4 tiles that start
    and end inside its 64-row blocks), with the bias per tile; the output equals the single-tile one."""
    for spec in (QuantSpec(8), QuantSpec(4, 128)):
        layer = _compact(1000, 256, spec, torch.bfloat16)  # int4: 1008 rows held
        x = torch.randn(100, 256).bfloat16()
        with torch.no_grad():
            whole = layer(x)
            monkeypatch.setattr(decoded, "TILE_BYTES", 24 * 256 * 2)
            tiled = layer(x)
            monkeypatch.undo()
        assert layer.last_path == "decoded"
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-2)


def test_samples_agree_with_their_training_form_at_many_rows():
    """Every quantized_linear sample in conftest.CODEC_SAMPLES at a prefill-sized input: the inference form's
    path (decoded, dequantize or a kernel) against the training form, in float32."""
    for sample in codec_samples("quantized_linear"):
        layer = sample.make()
        layer = layer[0] if isinstance(layer, tuple) else layer
        compact = CompactQuantizedLinear.from_tensors(layer.to_tensors(), layer.codec_params())
        x = torch.randn(200, sample.shape[-1])
        with torch.no_grad():
            expected = F.linear(x.double(), layer.dense_weight().double(), layer.bias.double())
            y = compact(x)
        assert (y.double() - expected).norm() / expected.norm() < 1e-5, (sample, compact.last_path)


@needs_kernel
@pytest.mark.parametrize("spec,kernel", [(QuantSpec(8), "int8"), (QuantSpec(4, 128), "int4")], ids=["int8", "int4"])
def test_the_kernel_runs_up_to_its_measured_row_limit(spec, kernel):
    """bfloat16: torch's kernel up to KERNEL_MAX_ROWS (measured against the decoded path), decode + GEMM past it."""
    layer = _compact(1000, 256, spec, torch.bfloat16)
    limit = qk.KERNEL_MAX_ROWS[spec.bits, torch.bfloat16]
    for n, path in ((1, kernel), (limit, kernel), (limit + 1, "decoded"), (512, "decoded")):
        with torch.no_grad():
            layer(torch.randn(n, 256).bfloat16())
        assert layer.last_path == path, n


@needs_kernel
@pytest.mark.parametrize("dtype,spec", [(torch.float32, QuantSpec(8)), (torch.float16, QuantSpec(8)),
                                        (torch.bfloat16, QuantSpec(8, 32)), (torch.float32, QuantSpec(8, 64))],
                         ids=["fp32-row", "fp16-row", "bf16-g32", "fp32-g64"])
def test_int8_without_torchs_kernel_runs_the_dense_int8_kernel_at_few_rows(dtype, spec):
    """Symmetric int8 that torch's int8 kernel does not run (or runs as plain loops) takes the compiled dense int8
    kernel up to DENSE_INT8_MAX_ROWS (measured against decode + GEMM), decode + GEMM past it; same values."""
    layer = _compact(1000, 256, spec, dtype)
    limit = qk.DENSE_INT8_MAX_ROWS
    weight = layer.values.codes.double() * layer.values.scales.double().repeat_interleave(spec.group(256), 1)
    for n, path in ((1, "cpu-int8"), (limit, "cpu-int8"), (limit + 1, "decoded")):
        x = torch.randn(n, 256).to(dtype)
        with torch.no_grad():
            y = layer(x)
        assert layer.last_path == path, n
        expected = x.double() @ weight.t() + layer.bias.double()
        assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < TOLERANCE[dtype], n
