"""Triton kernels for the row-sparse inference forms (bitmask and CSR sparse layers, FiPS's V) and for
decoding any row-sparse or condensed weight to dense on the GPU. Imported only when a CUDA path is wanted;
under TRITON_INTERPRET=1 they also run on CPU tensors, which is how the tests check them without a GPU.

What they read is what the layer holds after `.to("cuda")`: nothing is built per call, and no call waits
for the GPU (no mask indexing, no `.item()`, no index tensor made from the structure):
- CSR: values, int16/int32 column indices, int64 row pointer. A program owns BLOCK_R rows x BLOCK_N input
  rows and walks its rows' entries BLOCK_K at a time, up to the longest of its rows (read from the row
  pointer on the device), gathering x at the column indices.
- bitmask: values and int64 words (bit j of word w = column 64 w + j, each row padded to whole words) plus
  the int64 offset of each row's first value. A program walks the columns BLOCK_C at a time, reading x
  contiguously; a kept weight's position among the values is its row's offset plus the kept bits before
  it (a running count across chunks, a prefix sum inside one).
- condensed: a CSR whose rows all hold k entries (row r starts at r k), so it shares the CSR kernels.

Two kernels per layout: `gemv` (y = x W^T + b for a few input rows; no tensor cores, every weight read
once per BLOCK_N input rows) and `decode` (the dense weight, then cuBLAS: for more input rows, where a
dense GEMM on tensor cores wins and writing the dense weight once costs about as much as reading it).
Where each wins is in kernels/cuda_paths.py's table. Accumulation is in float32; the output has x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

REGISTER_ELEMENTS = 8192  # a program's (rows x entries x inputs) block: 64 per thread with 4 warps, kept in registers


@triton.jit
def _row_bounds(rp_ptr, rows, row_ok, k_fixed, FIXED: tl.constexpr):
    """(start, length) of each row's entries: from the row pointer, or r k and k for a condensed layer."""
    if FIXED:
        start = rows.to(tl.int64) * k_fixed
        length = tl.where(row_ok, k_fixed, 0).to(tl.int64)
    else:
        start = tl.load(rp_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        length = tl.load(rp_ptr + rows + 1, mask=row_ok, other=0).to(tl.int64) - start
    return start, length


@triton.jit
def _csr_gemv_kernel(x_ptr, v_ptr, col_ptr, rp_ptr, b_ptr, y_ptr, N, R, k_fixed, stride_xn, stride_yn,
                     FIXED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_ok, n_ok = rows < R, ns < N
    start, length = _row_bounds(rp_ptr, rows, row_ok, k_fixed, FIXED)
    x_n = ns.to(tl.int64) * stride_xn  # (BN,)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.max(length, axis=0), BLOCK_K):  # up to the longest row of this program
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        m = ks[None, :] < length[:, None]  # (BR, BK)
        off = start[:, None] + ks[None, :]
        v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        j = tl.load(col_ptr + off, mask=m, other=0).to(tl.int64)
        xv = tl.load(x_ptr + j[:, :, None] + x_n[None, None, :], mask=m[:, :, None] & n_ok[None, None, :],
                     other=0.0).to(tl.float32)  # (BR, BK, BN)
        acc += tl.sum(v[:, :, None] * xv, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    y_off = ns[None, :].to(tl.int64) * stride_yn + rows[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _csr_decode_kernel(v_ptr, col_ptr, rp_ptr, d_ptr, R, C, k_fixed, FIXED: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Scatter each row's entries into a zeroed dense (R, C)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    start, length = _row_bounds(rp_ptr, rows, row_ok, k_fixed, FIXED)
    for k0 in range(0, tl.max(length, axis=0), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = ks[None, :] < length[:, None]
        off = start[:, None] + ks[None, :]
        v = tl.load(v_ptr + off, mask=m, other=0.0)
        j = tl.load(col_ptr + off, mask=m, other=0).to(tl.int64)
        tl.store(d_ptr + rows[:, None].to(tl.int64) * C + j, v, mask=m)


@triton.jit
def _bitmask_chunk(v_ptr, w_ptr, rows, row_ok, running, c0, C, words_per_row, BLOCK_C: tl.constexpr):
    """One chunk of columns of BLOCK_R rows: (the weights, dense with zeros, (BR, BC) float32, their
    columns, the kept count per row)."""
    cs = c0 + tl.arange(0, BLOCK_C)  # (BC,)
    c_ok = cs < C
    word = tl.load(w_ptr + rows[:, None].to(tl.int64) * words_per_row + (cs // 64)[None, :],
                   mask=row_ok[:, None] & c_ok[None, :], other=0)  # (BR, BC): each word read for its 64 columns
    bits = ((word >> (cs % 64).to(tl.int64)[None, :]) & 1).to(tl.int32)
    before = tl.cumsum(bits, axis=1) - bits  # kept weights before each column, inside the chunk
    v = tl.load(v_ptr + running[:, None] + before, mask=bits != 0, other=0.0)
    return v, cs, c_ok, tl.sum(bits, axis=1)


@triton.jit
def _bitmask_gemv_kernel(x_ptr, v_ptr, w_ptr, rp_ptr, b_ptr, y_ptr, N, R, C, words_per_row, stride_xn, stride_yn,
                         HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, n_ok = rows < R, ns < N
    running = tl.load(rp_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # (BR,) where each row's values start
    x_n = ns.to(tl.int64) * stride_xn
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        v, cs, c_ok, kept = _bitmask_chunk(v_ptr, w_ptr, rows, row_ok, running, c0, C, words_per_row, BLOCK_C)
        xv = tl.load(x_ptr + cs[:, None] + x_n[None, :], mask=c_ok[:, None] & n_ok[None, :],
                     other=0.0).to(tl.float32)  # (BC, BN), contiguous along the columns
        acc += tl.sum(v.to(tl.float32)[:, :, None] * xv[None, :, :], axis=1)
        running += kept
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    y_off = ns[None, :].to(tl.int64) * stride_yn + rows[:, None]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _bitmask_decode_kernel(v_ptr, w_ptr, rp_ptr, d_ptr, R, C, words_per_row, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    """Every element of the dense (R, C) written, zeros included: no zeroing pass before."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    running = tl.load(rp_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        v, cs, c_ok, kept = _bitmask_chunk(v_ptr, w_ptr, rows, row_ok, running, c0, C, words_per_row, BLOCK_C)
        tl.store(d_ptr + rows[:, None].to(tl.int64) * C + cs[None, :], v, mask=row_ok[:, None] & c_ok[None, :])
        running += kept


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _is_bitmask(cols: torch.Tensor) -> bool:
    return cols.dtype == torch.int64  # int64 words; CSR and condensed indices are int16 / int32


def row_sparse_mm(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor | None,
                  bias: torch.Tensor | None, rows: int, columns: int, k_fixed: int = 0) -> torch.Tensor:
    """y (N, rows) = x (N, columns) @ W^T (+ bias) for a row-sparse W: bitmask words or CSR indices with
    their row pointer, or (row_ptr None) condensed rows of `k_fixed` entries each."""
    n = x.shape[0]
    y = torch.empty(n, rows, dtype=x.dtype, device=x.device)
    if n == 0 or rows == 0:
        return y
    x = x.contiguous()
    block_n = min(_pow2(n), 16)
    grid = lambda block_r: (triton.cdiv(rows, block_r), triton.cdiv(n, block_n))  # noqa: E731
    bias_arg = bias if bias is not None else values
    if _is_bitmask(cols):
        block_c = max(64, min(1024, REGISTER_ELEMENTS // (4 * block_n), _pow2(columns)))
        block_r = max(1, REGISTER_ELEMENTS // (block_c * block_n))
        _bitmask_gemv_kernel[grid(block_r)](x, values, cols, row_ptr, bias_arg, y, n, rows, columns, cols.shape[1],
                                            x.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_R=block_r,
                                            BLOCK_C=block_c, BLOCK_N=block_n, num_warps=4)
        return y
    block_k = 64
    block_r = max(1, min(32, REGISTER_ELEMENTS // (block_k * block_n)))  # enough programs to fill the GPU at batch 1
    _csr_gemv_kernel[grid(block_r)](x, values, cols, row_ptr if row_ptr is not None else cols, bias_arg, y, n, rows,
                                    k_fixed, x.stride(0), y.stride(0), FIXED=row_ptr is None,
                                    HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_N=block_n,
                                    num_warps=4)
    return y


def row_sparse_dense(values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor | None, rows: int,
                     columns: int, k_fixed: int = 0) -> torch.Tensor:
    """The dense (rows, columns) weight of the same structures as `row_sparse_mm`, zeros elsewhere."""
    if _is_bitmask(cols):
        dense = torch.empty(rows, columns, dtype=values.dtype, device=values.device)
        if rows and columns:
            block_c = max(64, min(1024, _pow2(columns)))
            block_r = max(1, REGISTER_ELEMENTS // block_c)
            _bitmask_decode_kernel[(triton.cdiv(rows, block_r),)](values, cols, row_ptr, dense, rows, columns,
                                                                   cols.shape[1], BLOCK_R=block_r, BLOCK_C=block_c,
                                                                   num_warps=4)
        return dense
    dense = torch.zeros(rows, columns, dtype=values.dtype, device=values.device)
    if rows and values.numel():
        block_k = 64
        block_r = REGISTER_ELEMENTS // block_k // 4
        _csr_decode_kernel[(triton.cdiv(rows, block_r),)](values, cols, row_ptr if row_ptr is not None else cols,
                                                           dense, rows, columns, k_fixed, FIXED=row_ptr is None,
                                                           BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return dense
