"""FiPS initialisation: the rank a budget allows, a group's concatenated MLP weights, and their SVD.

Every MLP matrix of a group is viewed as d x h (d the block width): fc1 / gate / up weights (h x d)
transposed, fc2 / down weights (d x h) as they are. Concatenated along the second axis they form
W_cat (d x H, H = f h n for f matrices in each of n blocks), whose SVD gives the shared base
U = U[:, :r] and the per-matrix factors V_i = (S Vh)[:r] sliced back into r x h pieces.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from compresscli.core.errors import StageError
from compresscli.codecs.fips.training import FipsLinear
from compresscli.methods.magnitude import keep_masks

# Rank beyond min(d, H) adds zero columns to U. The matching rows of V are the leading rows scaled by
# this factor rather than zeros: U's zero columns keep the product unchanged, while those non-zero rows
# give the new columns of U a gradient from the first step (all-zero rows would stay dead forever).
PAD_SCALE = 1.0 / 32


def fips_rank(width: int, columns: int, budget: float, sparsity: float) -> int:
    """The rank r for which U (d r) plus the kept entries of V ((1 - s) r H) fill budget p of d H:
    r = floor(H d p / (H (1 - s) + d))."""
    return math.floor(columns * width * budget / (columns * (1.0 - sparsity) + width) + 1e-9)


def kept_entries(rank: int, columns: int, sparsity: float) -> int:
    """Entries of V (rank x H) that survive sparsity s, rounded as the masks round them."""
    return round((1.0 - sparsity) * rank * columns)


def view_dxh(weight: torch.Tensor, orientation: str) -> torch.Tensor:
    """A Linear weight as d x h: "in" layers (h x d) transposed, "out" layers (d x h) as is."""
    return weight.t() if orientation == "in" else weight


def decompose(w_cat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U (d x rank) and V (rank x H), singular values folded into V, with U @ V the best rank-`rank`
    approximation of `w_cat` (in float32). Exact when rank >= min(d, H), padded beyond it."""
    u, s, vh = torch.linalg.svd(w_cat.float(), full_matrices=False)  # (d, k), (k,), (k, H)
    v = s[:, None] * vh
    k = s.numel()
    if rank <= k:
        return u[:, :rank].contiguous(), v[:rank].contiguous()
    extra = rank - k
    pad_rows = v[torch.arange(extra, device=v.device) % k] * PAD_SCALE
    return torch.cat([u, u.new_zeros(u.shape[0], extra)], 1), torch.cat([v, pad_rows], 0)


def magnitude_masks(factors: list[torch.Tensor], sparsity: float,
                    current: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One global magnitude threshold over all factors of a group (unstructured); entries outside
    `current` masks are never kept."""
    scores = {i: f.abs() for i, f in enumerate(factors)}
    current = current or [torch.ones_like(f, dtype=torch.bool) for f in factors]
    masks = keep_masks(scores, dict(enumerate(current)), sparsity, "global")
    return [masks[i] for i in range(len(factors))]


def build_group(layers: list[tuple[str, nn.Linear, str]], budget: float, sparsity: float,
                mask_sparsity: float, base_key: str) -> tuple[list[FipsLinear], int]:
    """FiPS layers for one group from its (name, Linear, orientation) list, in block order.

    `sparsity` sets the rank (the budget's arithmetic); `mask_sparsity` the initial masks (lower than
    `sparsity` when gradual magnitude pruning will remove the rest). Returns the layers and the rank.
    """
    pieces = [view_dxh(layer.weight.detach(), orientation) for _, layer, orientation in layers]
    widths = {p.shape[0] for p in pieces}
    if len(widths) != 1:
        raise StageError(f"the MLP layers {[n for n, _, _ in layers]} have different widths {sorted(widths)}; "
                         "a group must not cross a change of width")
    w_cat = torch.cat(pieces, 1)  # (d, H)
    d, columns = w_cat.shape
    rank = fips_rank(d, columns, budget, sparsity)
    if rank < 1:
        raise StageError(f"budget {budget} leaves rank 0 for the group of {layers[0][0]}; raise the budget "
                         "or lower the sparsity")
    u, v = decompose(w_cat, rank)
    factors = list(v.split([p.shape[1] for p in pieces], dim=1))  # (r, h_i) each
    masks = magnitude_masks(factors, mask_sparsity)
    dtype = layers[0][1].weight.dtype
    base = nn.Parameter(u.to(dtype))
    built = [FipsLinear(base, f.to(dtype), m, layer.bias, orientation, base_key, counts_base=i == 0)
             for i, ((_, layer, orientation), f, m) in enumerate(zip(layers, factors, masks))]
    return built, rank
