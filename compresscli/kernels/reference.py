"""The pure-PyTorch products: the condensed reference definition, and the dense fallbacks (the
structure decoded to a dense weight, then F.linear) that run wherever no compiled kernel applies.

Every condensed path computes the same thing, y (N, R) = sum_j values[r, j] * x[n, indices[r, j]]
(+ bias[r]), on the compact rows of a layer (ablated rows are the module's business, not the kernels').
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GATHER_CHUNK = 1 << 24  # elements of the (n, R, k) gathered tensor materialised at once


def scatter_dense(values: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense (R, C) weight with zeros where nothing is kept; differentiable in `values`.
    In place into fresh zeros: the out-of-place scatter would copy the whole dense weight once more."""
    return values.new_zeros(values.shape[0], in_features).scatter_(1, indices.long(), values)


def dense_mm(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
             in_features: int) -> torch.Tensor:
    """Scatter to dense, then the dense GEMM: exact masked-dense math, and what training runs."""
    return F.linear(x, scatter_dense(values, indices, in_features), bias)  # (N, C) -> (N, R)


def gather_mm(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The definition, literally: gather the k inputs of every neuron, weight, sum (float32 accumulation).

    Chunked over input rows so that the gathered (n, R, k) tensor stays within GATHER_CHUNK elements.
    """
    n = x.shape[0]
    rows, k = values.shape
    step = max(1, GATHER_CHUNK // max(1, rows * k))
    idx = indices.long()
    v = values.float()
    out = []
    for start in range(0, n, step):
        gathered = x[start:start + step, idx].float()  # (n', R, k)
        out.append((gathered * v).sum(-1))  # (n', R)
    y = torch.cat(out) if out else x.new_zeros(0, rows, dtype=torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def unpack_row_bits(words: torch.Tensor, columns: int) -> torch.Tensor:
    """Bool (rows, columns) from bitmask words (rows, words per row; bit j of word w = column 64 w + j),
    one byte per element on the words' device (little-endian bytes, as the CPU kernels read them)."""
    rows = words.shape[0]
    as_bytes = words.contiguous().view(torch.uint8).view(rows, -1, 1)  # (rows, 8 wpr, 1)
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    return ((as_bytes >> shifts) & 1).view(rows, -1)[:, :columns].bool()


def row_sparse_mask(cols: torch.Tensor, row_ptr: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Bool (rows, columns): the entries a row-sparse structure stores (int16 / int32 column indices with
    their row pointer, or int64 bitmask words), on the structure's device."""
    if cols.dtype == torch.int64:
        return unpack_row_bits(cols, columns)
    row_of = torch.repeat_interleave(torch.arange(rows, device=cols.device), row_ptr.long().diff())
    mask = torch.zeros(rows, columns, dtype=torch.bool, device=cols.device)
    mask[row_of, cols.long()] = True
    return mask


def row_sparse_dense(values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor, rows: int,
                     columns: int) -> torch.Tensor:
    """The dense (rows, columns) matrix of a row-sparse structure (kernels.cpu.sparse_mm's layout), in
    PyTorch ops on any device; zeros elsewhere. Values are in row-major order (columns ascending)."""
    dense = values.new_zeros(rows, columns)
    dense[row_sparse_mask(cols, row_ptr, rows, columns)] = values
    return dense
