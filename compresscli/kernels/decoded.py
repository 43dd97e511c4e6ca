"""The many-rows path of every compressed CPU product: decode the weight a tile of rows at a time into a
reused buffer and multiply each tile by torch's GEMM (oneDNN / MKL, AMX for bfloat16 where it runs).

At hundreds of input rows (a prompt's prefill) a GEMM is compute-bound and the sparse kernels, which read
each weight once per group of input rows, lose to it; decoding costs one pass over the stored bytes, a small
fraction of the GEMM. The buffer is kept per thread and dtype, so a call neither allocates a dense weight nor
faults one in: a layer up to TILE_BYTES is decoded whole and multiplied by one GEMM, a larger one in tiles of
rows (the buffer never exceeds TILE_BYTES). Measured on the 2-core Sapphire Rapids at 512 rows, 2 threads,
50% bitmask (benchmarks/results/kernel_thresholds.md has the thresholds): whole layer against 2 and 8 MiB
tiles, bfloat16 5632x2048 8.0 ms vs 18.4 / 9.7 (dense 8.6), 11008x4096 38.4 vs 46.4 / 37.9 (dense 38.0);
float32 11008x4096 222 vs 239 / 209 (dense 198). Which products take this path, by rows, shape and dtype, is
measured too (kernels/cpu_thresholds.py).
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn.functional as F

TILE_BYTES = 32 << 20  # the most of a decoded weight held at once: a 1.26B Llama's bf16 MLP layer (23 MB) whole

_buffers = threading.local()


def _tile_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least `numel` elements of `dtype`, kept for this thread (grown, never shrunk)."""
    kept = getattr(_buffers, "by_dtype", None)
    if kept is None:
        kept = _buffers.by_dtype = {}
    buf = kept.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = kept[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


DecodeRows = Callable[[int, int, torch.Tensor], torch.Tensor]
"""decode(r0, r1, out): rows [r0, r1) of the dense weight written into `out` ((r1 - r0) x columns, or columns x
(r1 - r0) for a transposed decoder), returned."""


def decoded_mm(x: torch.Tensor, decode: DecodeRows, rows: int, columns: int, bias: torch.Tensor | None,
               dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
    """y (N, rows) = x (N, columns) @ W^T (+ bias), W decoded tile by tile by `decode` (in `dtype`).
    `transposed`: the decoder writes W^T's columns (a tile (columns, tile rows), for layouts whose rows are
    interleaved at each input, such as torch's int4 kernel layout); the GEMM then reads it as x @ tile, which
    costs oneDNN / MKL nothing more than x @ W^T."""
    step = max(1, TILE_BYTES // max(1, columns * torch.empty(0, dtype=dtype).element_size()))

    def tile(r0: int, r1: int, buffer: torch.Tensor) -> torch.Tensor:
        if transposed:
            return decode(r0, r1, buffer[:(r1 - r0) * columns].view(columns, r1 - r0)).t()
        return decode(r0, r1, buffer[:(r1 - r0) * columns].view(r1 - r0, columns))

    if step >= rows:
        return F.linear(x, tile(0, rows, _tile_buffer(rows * columns, dtype)), bias)
    y = torch.empty(x.shape[0], rows, dtype=x.dtype)
    buffer = _tile_buffer(step * columns, dtype)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        y[:, r0:r1] = F.linear(x, tile(r0, r1, buffer), None if bias is None else bias[r0:r1])
    return y
