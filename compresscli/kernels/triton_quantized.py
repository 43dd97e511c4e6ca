"""Triton kernels for quantized dense layers on CUDA: y = x @ dequant(W)^T (+ bias), the weight read as the
file holds it and dequantized in registers. Imported only when a CUDA path is wanted; under TRITON_INTERPRET=1
they also run on CPU tensors, which is how the tests check them without a GPU.

What they read (codecs/quant/packing.py, values.py), with nothing built per call and no host sync:
- codes (rows, row_bytes): int8 as they are, or each row one little-endian bitstream of offset-binary codes
  (code j at bits j b .. j b + b - 1, stored as code + 2^(b-1)), padded to a whole byte per row. A tile
  reads, for input column j, the byte holding bit j b (and for int3 the next one: a code may straddle two
  bytes), shifts and masks; neighbouring columns read the same byte, which the cache serves.
- scales (rows, groups) and, asymmetric, int8 zeros (rows, groups): column j uses group j // group_size
  (per row: one group of all the columns); value = (code - zero) * scale in float32.
NOT the CPU int4 kernel's reordered layout (kernels/quantized.py): a layer moved to CUDA goes back to the
file's layout at its first call there (CompactQuantizedLinear).

Two kernels, one dequantizing helper:
- `gemv` (a few input rows): a program owns BLOCK_R weight rows x BLOCK_N (<= 16) input rows and reduces
  (BLOCK_R, BLOCK_K, BLOCK_N) products in float32; every weight is dequantized once per BLOCK_N inputs. No
  tensor cores: at batch 1 the product is bound by reading the codes, and tl.dot needs 16 rows a side.
- `tiled` (more rows): a GEMM tile of BLOCK_N inputs x BLOCK_R weight rows, the dequantized (BLOCK_R, BLOCK_K)
  tile rounded to x's dtype and fed to tl.dot (tensor cores; float32 inputs in exact IEEE float32, as
  F.linear does by default), float32 accumulation. Each weight is dequantized once per BLOCK_N inputs.
Which runs for a batch is kernels/cuda_paths.py's table ("quantized"; design points until measured).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequantized_tile(c_ptr, s_ptr, z_ptr, rows, row_ok, ks, K, row_bytes, groups, group,
                      BITS: tl.constexpr, ASYMMETRIC: tl.constexpr):
    """The (BR, BK) float32 weights at `rows` x input columns `ks` (0 outside the matrix)."""
    m = row_ok[:, None] & (ks < K)[None, :]
    row_base = rows.to(tl.int64)[:, None] * row_bytes
    if BITS == 8:
        q = tl.load(c_ptr + row_base + ks[None, :], mask=m, other=0).to(tl.float32)
    else:
        bit = ks * BITS  # (BK,) the first bit of each code in its row's bitstream
        byte = (bit // 8)[None, :]
        word = tl.load(c_ptr + row_base + byte, mask=m, other=0).to(tl.int32)
        if BITS == 3:  # a code may run into the next byte (the row's last byte has no next one)
            nxt = tl.load(c_ptr + row_base + byte + 1, mask=m & (byte + 1 < row_bytes), other=0).to(tl.int32)
            word = word | (nxt << 8)
        q = (((word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)) - (1 << (BITS - 1))).to(tl.float32)
    g_off = rows.to(tl.int64)[:, None] * groups + (ks // group)[None, :]
    if ASYMMETRIC:
        q -= tl.load(z_ptr + g_off, mask=m, other=0).to(tl.float32)
    return q * tl.load(s_ptr + g_off, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, c_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, R, K, row_bytes, groups, group, stride_xn, stride_yn,
                 BITS: tl.constexpr, ASYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_ok, n_ok = rows < R, ns < N
    x_n = ns.to(tl.int64) * stride_xn
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        w = _dequantized_tile(c_ptr, s_ptr, z_ptr, rows, row_ok, ks, K, row_bytes, groups, group, BITS, ASYMMETRIC)
        xv = tl.load(x_ptr + ks[:, None] + x_n[None, :], mask=(ks < K)[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)  # (BK, BN)
        acc += tl.sum(w[:, :, None] * xv[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    y_off = ns[None, :].to(tl.int64) * stride_yn + rows[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _tiled_kernel(x_ptr, c_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, R, K, row_bytes, groups, group, stride_xn, stride_yn,
                  BITS: tl.constexpr, ASYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    row_ok, n_ok = rows < R, ns < N
    x_n = ns.to(tl.int64)[:, None] * stride_xn
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + x_n + ks[None, :], mask=n_ok[:, None] & (ks < K)[None, :], other=0.0)  # (BN, BK)
        w = _dequantized_tile(c_ptr, s_ptr, z_ptr, rows, row_ok, ks, K, row_bytes, groups, group, BITS, ASYMMETRIC)
        acc = tl.dot(xv, tl.trans(w.to(xv.dtype)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    y_off = ns[:, None].to(tl.int64) * stride_yn + rows[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & row_ok[None, :])


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def quantized_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bits: int, group: int, bias: torch.Tensor | None, tiled: bool) -> torch.Tensor:
    """y (N, rows) = x (N, cols) @ dequant(W)^T (+ bias) for codes / scales / zeros as the file holds them
    (`group` inputs per scale; cols per row for one scale a row); float32 accumulation, x's dtype out."""
    n, cols = x.shape
    rows = codes.shape[0]
    y = torch.empty(n, rows, dtype=x.dtype, device=x.device)
    if n == 0 or rows == 0:
        return y
    x = x.contiguous()
    scales = scales.contiguous()
    args = (x, codes, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y, n,
            rows, cols, codes.stride(0), scales.shape[1], group, x.stride(0), y.stride(0))
    flags = {"BITS": bits, "ASYMMETRIC": zeros is not None, "HAS_BIAS": bias is not None, "num_warps": 4}
    if tiled:
        block_n = min(64, max(16, _pow2(n)))
        block_r, block_k = 64, 32  # (BR, BK) + (BN, BK) tiles, dot on (BN, BK) x (BK, BR)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
        grid = (triton.cdiv(n, block_n), triton.cdiv(rows, block_r))
        _tiled_kernel[grid](*args, PRECISION=precision, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_N=block_n, **flags)
        return y
    block_n = min(16, _pow2(n))
    block_k = min(128 if block_n <= 2 else 64, max(16, _pow2(cols)))
    block_r = max(4, min(32, 8192 // (block_k * block_n)))  # the (BR, BK, BN) block kept at <= 8192 elements
    grid = (triton.cdiv(rows, block_r), triton.cdiv(n, block_n))
    _gemv_kernel[grid](*args, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_N=block_n, **flags)
    return y
