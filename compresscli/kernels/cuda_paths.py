"""Which product runs on CUDA for a compressed layer, read from a measurement table.

Paths (all compute y (N, R) = x W^T + b; the Triton kernels are in triton_sparse.py / triton_kernels.py /
triton_quantized.py):
  triton_gemv    the row-sparse kernel on what the layer holds (bitmask words or CSR / condensed indices), or
                 the quantized GEMV on its codes; few input rows: each weight is read once per 16 input rows,
                 no tensor cores.
  triton_tiled   condensed: the batch-tiled condensed kernel; quantized: the dequantize-in-kernel GEMM tile
                 (tl.dot on tensor cores).
  triton_decode  the dense weight written by a Triton kernel, then cuBLAS (tensor cores; the dense weight
                 lives for the call only).
  dense          the PyTorch decode (boolean-mask indexing: a host sync and an index build per call; for a
                 quantized layer, its weight dequantized for the call); what runs with gradients, or when
                 Triton is missing.

The table: for each layout, rows of [max input rows (None: any), max kept fraction, path]; the first row
that admits the call's input rows and density gives the path, and a layout's last row admits everything.
`DESIGN_TABLE` is NOT measured (no GPU was lent when it was written): its rows are design points from the
bytes each path reads. On bf16, a bitmask layer's GEMV reads 2 d + 1/8 bytes per weight against dense's 2,
a CSR layer's 4 d (values + int16 indices), a condensed one's 4 d; these kernels use no tensor cores, so
past a few input rows cuBLAS on a decoded weight should win whatever the density. A quantized layer's
GEMV reads bits / 8 bytes per weight; past 16 input rows (where tl.dot's tiles fill) its tiled kernel takes
over. `benchmarks/gpu_check.py` times every path at 4096 x 11008 for batch 1-256 on the lent GPU and writes
`cuda_table.json` in this format with the crossovers it measured; $COMPRESSCLI_CUDA_TABLE pointing at such a
file replaces this table (and the measured one, once committed, replaces `DESIGN_TABLE` here).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from compresscli.kernels import reference

TABLE_ENV = "COMPRESSCLI_CUDA_TABLE"
LAYOUTS = {"row_sparse": ("triton_gemv", "triton_decode", "dense"),
           "condensed": ("triton_gemv", "triton_tiled", "triton_decode", "dense"),
           "quantized": ("triton_gemv", "triton_tiled", "dense")}
DESIGN_TABLE: dict[str, Any] = {
    "measured_on": None,  # the GPU a measured table came from; None: design points, never measured
    "row_sparse": [[4, 1.0, "triton_gemv"], [16, 0.5, "triton_gemv"], [None, 1.0, "triton_decode"]],
    "condensed": [[4, 0.3, "triton_gemv"], [64, 0.2, "triton_tiled"], [None, 1.0, "triton_decode"]],
    "quantized": [[16, 1.0, "triton_gemv"], [None, 1.0, "triton_tiled"]],  # density: always 1.0
}


def check_table(table: dict[str, Any], where: str) -> dict[str, Any]:
    """`table` if every layout has rows of known paths ending in one that admits everything, else ValueError."""
    for layout, paths in LAYOUTS.items():
        rows = table.get(layout)
        if not rows or any(len(r) != 3 or r[2] not in paths for r in rows) or rows[-1][0] is not None:
            raise ValueError(f"{where}: '{layout}' must be rows of [max rows or null, max density, one of "
                             f"{', '.join(paths)}], the last with null rows")
    return table


@lru_cache(maxsize=None)
def table(path: str | None = None) -> dict[str, Any]:
    """The table in force: the file $COMPRESSCLI_CUDA_TABLE names (a measured one; a layout it lacks, measured
    before that layout existed, keeps DESIGN_TABLE's rows), else DESIGN_TABLE."""
    path = path or os.environ.get(TABLE_ENV)
    if not path:
        return DESIGN_TABLE
    return check_table({**DESIGN_TABLE, **json.loads(open(path).read())}, path)


def choose(layout: str, n: int, density: float, forced: str | None = None) -> str:
    """The path for `n` input rows at kept fraction `density` (`forced` wins when the layout has it)."""
    if forced in LAYOUTS[layout]:
        return forced
    for max_rows, max_density, path in table()[layout]:
        if (max_rows is None or n <= max_rows) and density <= max_density:
            return path
    return table()[layout][-1][2]


def row_sparse_mm(x: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor,
                  bias: torch.Tensor | None, rows: int, columns: int,
                  forced: str | None = None) -> tuple[torch.Tensor, str]:
    """y (N, rows) for a bitmask / CSR weight on CUDA, no gradients; returns (y, path)."""
    from compresscli.kernels import triton_sparse

    path = choose("row_sparse", x.shape[0], values.numel() / max(1, rows * columns), forced)
    if path == "triton_gemv":
        return triton_sparse.row_sparse_mm(x, values, cols, row_ptr, bias, rows, columns), path
    if path == "triton_decode":
        return F.linear(x, triton_sparse.row_sparse_dense(values, cols, row_ptr, rows, columns), bias), path
    return F.linear(x, reference.row_sparse_dense(values, cols, row_ptr, rows, columns).to(x.dtype), bias), path


def condensed_decode_mm(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                        in_features: int) -> torch.Tensor:
    """The condensed layer decoded by the Triton kernel (no int64 copy of its indices), then cuBLAS."""
    from compresscli.kernels import triton_sparse

    rows, k = values.shape
    dense = triton_sparse.row_sparse_dense(values.contiguous(), indices.contiguous(), None, rows, in_features, k)
    return F.linear(x, dense, bias)


def quantized_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group: int, bias: torch.Tensor | None, forced: str | None = None) -> tuple[torch.Tensor, str] | None:
    """y (N, rows) for a quantized dense weight on CUDA as the file holds it (codes, scales, zeros), no
    gradients; returns (y, path), or None where the path is `dense` (the layer dequantizes in PyTorch)."""
    path = choose("quantized", x.shape[0], 1.0, forced)
    if path == "dense":
        return None
    from compresscli.kernels import triton_quantized

    return triton_quantized.quantized_mm(x, codes, scales, zeros, bits, group, bias, path == "triton_tiled"), path
