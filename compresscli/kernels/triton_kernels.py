"""Triton kernels for condensed layers on CUDA. Imported only when a CUDA path is wanted (triton is
optional; the CPU machines may not have it). Under TRITON_INTERPRET=1 they also run on CPU tensors,
which is how the tests check them without a GPU.

One kernel, two launch shapes. A program owns a tile of BLOCK_R neurons x BLOCK_N input rows and walks
the k kept inputs BLOCK_K at a time: it loads the (BLOCK_R, BLOCK_K) values and int16/int32 indices
(contiguous per neuron, so coalesced), gathers x at those indices for its BLOCK_N input rows into a
(BLOCK_R, BLOCK_K, BLOCK_N) block, and reduces over k in float32.
- gemv (a few rows): x as stored, (N, C); BLOCK_N covers all rows, many small programs over neurons so
  that enough value/index bytes are in flight to approach the memory bandwidth.
- tiled (more rows): x transposed to (C, N), so the BLOCK_N inputs one index selects are contiguous
  and the gather is coalesced along the batch; 32-64 rows per program.
Neither uses tensor cores (each neuron reads its own set of inputs), so past some batch size cuBLAS on
the dense weight wins; dispatch.py decides where.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _condensed_kernel(x_ptr, v_ptr, idx_ptr, b_ptr, y_ptr, N, R, K, stride_xn, stride_xc, stride_yn,
                      HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_ok = rows < R
    n_ok = ns < N
    row_base = rows.to(tl.int64) * K  # (BR,) offset of each neuron's values and indices
    x_n = ns.to(tl.int64) * stride_xn  # (BN,)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        m = row_ok[:, None] & (ks[None, :] < K)  # (BR, BK)
        off = row_base[:, None] + ks[None, :]
        v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)  # (BR, BK)
        j = tl.load(idx_ptr + off, mask=m, other=0).to(tl.int64)  # (BR, BK)
        x_off = j[:, :, None] * stride_xc + x_n[None, None, :]  # (BR, BK, BN)
        xv = tl.load(x_ptr + x_off, mask=m[:, :, None] & n_ok[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v[:, :, None] * xv, axis=1)  # (BR, BN)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    y_off = ns[None, :].to(tl.int64) * stride_yn + rows[:, None]  # (BR, BN)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def launch_config(n: int, rows: int, k: int, tiled: bool) -> dict[str, int]:
    """Tile sizes: the (BLOCK_R, BLOCK_K, BLOCK_N) block is kept at <= 8192 elements (64 per thread
    with 4 warps), so it stays in registers."""
    if tiled:
        block_n = 64 if n >= 64 else max(8, _pow2(n))
        block_r = 32
        block_k = max(1, 8192 // (block_r * block_n))
    else:
        block_n = _pow2(n)
        block_k = min(256 if block_n == 1 else 128, max(16, _pow2(k)))
        block_r = max(4, min(16 if rows >= 2048 else 8, 8192 // (block_k * block_n)))
    return {"BLOCK_R": block_r, "BLOCK_K": block_k, "BLOCK_N": block_n, "num_warps": 4}


def condensed_mm(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                 tiled: bool) -> torch.Tensor:
    """y (N, R) = sum_j values[r, j] * x[n, indices[r, j]] (+ bias[r]), float32 accumulation, x's dtype out."""
    n, c = x.shape
    rows, k = values.shape
    y = torch.empty(n, rows, dtype=x.dtype, device=x.device)
    if n == 0 or rows == 0:
        return y
    if tiled:
        xs = x.t().contiguous()  # (C, N): the inputs one index selects are contiguous
        stride_xn, stride_xc = 1, n
    else:
        xs = x.contiguous()
        stride_xn, stride_xc = c, 1
    cfg = launch_config(n, rows, k, tiled)
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _condensed_kernel[grid](xs, values.contiguous(), indices.contiguous(), bias if bias is not None else values,
                            y, n, rows, k, stride_xn, stride_xc, y.stride(0), HAS_BIAS=bias is not None, **cfg)
    return y
