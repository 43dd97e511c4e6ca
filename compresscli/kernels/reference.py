"""The pure-PyTorch condensed products: the reference definition and the dense fallback.

Every path computes the same thing, y (N, R) = sum_j values[r, j] * x[n, indices[r, j]] (+ bias[r]),
on the compact rows of a layer (ablated rows are the module's business, not the kernels').
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
