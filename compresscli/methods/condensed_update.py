"""One topology update of a condensed layer: SRigL's drop, regrow and neuron ablation (Lasby et al., ICLR 2024;
the rules of calgaryml/condensed-sparsity's RigLConstFanScheduler, re-implemented on the condensed tensors).

Given the layer's values (R x k), indices (R x k) and kept rows (None: all O neurons), its weight budget B
(values.numel() when recovery began) and the fraction f of the schedule:
  1. n = R * k active weights; n_prune = int(f * n) are dropped, n_keep = n - n_prune stay.
  2. ablation (min_salient): a weight is salient when among the layer's n_keep largest |W| (active ones) or
     its n_prune largest |dL/dW| (any position); a neuron with fewer than max(1, int(min_salient * B // O))
     salient weights is removed (at least ceil(B / C) neurons stay), its budget goes to the survivors
     (k = B / survivors, the one-shot rule), and a removed neuron whose gradient makes it salient again
     comes back with zero weights. Decided afresh at every update.
  3. drop: the n_keep largest |W| of the survivors' active weights stay, layer-wide (neurons lose
     different numbers), at most k per neuron (by magnitude; bites only when k shrank).
  4. grow: every surviving neuron (every group of M inputs, for N:M) regrows exactly its deficit among the
     positions not kept, by the largest |dL/dW| (RigL) or at random from a generator every rank seeds alike
     (SET); a weight dropped in 3 and chosen again keeps its value, a new one starts at exactly zero.
So every neuron holds exactly k inputs after every update (N of every M with N:M). Everything is exact and
deterministic given the inputs (mask_schedule's selections), so ranks holding the same summed gradient
agree. The work is done on the condensed tensors plus |dL/dW| and a bool mask (O x C); no dense weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compresscli.methods.mask_schedule import top_mask, top_per_row


@dataclass
class Topology:
    values: torch.Tensor  # (R', k') the layer's dtype, entries new to the mask exactly 0
    indices: torch.Tensor  # (R', k') int64, ascending in every row
    rows: torch.Tensor | None  # (R',) kept neuron ids ascending; None: every neuron
    slot_map: torch.Tensor  # (R', k') each entry's flat slot in the old values, -1 where new
    ablated: int  # neurons without weights after the update
    grown: int  # positions active now that were not before


def spread_fan_in(budget: int, survivors: int, fan_in: int, k_multiple: int = 1) -> int:
    """The fan-in that spreads `budget` weights over `survivors` neurons: rounded, up to a multiple of
    k_multiple, at most the fan-in (so an update that ablates nothing keeps the one-shot k)."""
    return min(fan_in, math.ceil(round(budget / survivors) / k_multiple) * k_multiple)


def neurons_kept(counts: torch.Tensor, threshold: int, must_keep: int, tiebreak: torch.Tensor) -> torch.Tensor:
    """Bool per neuron: salient count >= threshold; when fewer than `must_keep` pass (the budget would not fit
    their fan-in), the most salient are spared first, ties by `tiebreak` (larger first), then by id."""
    keep = counts >= threshold
    if int(keep.sum()) < must_keep:
        order = torch.sort(tiebreak, descending=True, stable=True).indices
        order = order[torch.sort(counts[order], descending=True, stable=True).indices]
        keep[order[:must_keep]] = True
    return keep


def _on_rows(rows: torch.Tensor, indices: torch.Tensor, flags: torch.Tensor, out: int, fan_in: int) -> torch.Tensor:
    """Bool (out, fan_in), True at the condensed positions where `flags` (rows x k) is."""
    dense = torch.zeros(out, fan_in, dtype=torch.bool, device=flags.device)
    dense[rows] = dense.new_zeros(rows.numel(), fan_in).scatter_(1, indices, flags)
    return dense


@torch.no_grad()
def update_topology(values: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor | None, grad: torch.Tensor | None,
                    fraction: float, budget: int, out_features: int, fan_in: int, *,
                    generator: torch.Generator | None = None, n_m: tuple[int, int] | None = None,
                    min_salient: float | None = None, k_multiple: int = 1) -> Topology:
    """One update (the module docstring). grad: dL/dW (out x fan_in, every neuron), needed to regrow by
    gradient and to ablate; `generator` (a seeded CPU generator) regrows at random instead (SET)."""
    kept_rows, k = values.shape
    device = values.device
    row_ids = torch.arange(out_features, device=device) if rows is None else rows.long().to(device)
    idx = indices.long()
    n_prune = int(kept_rows * k * fraction)
    n_keep = kept_rows * k - n_prune
    magnitude = values.detach().abs().float()  # (R, k)
    gradient = None if grad is None else torch.nan_to_num(grad.detach().float().abs(), nan=0.0)  # (O, C)

    alive = torch.zeros(out_features, dtype=torch.bool, device=device)
    alive[row_ids] = True
    new_k = k
    if min_salient is not None:
        strong = top_mask(magnitude, n_keep)  # (R, k)
        steep = top_mask(gradient, n_prune)  # (O, C)
        counts = steep.sum(1)
        counts[row_ids] += (strong & ~steep[row_ids].gather(1, idx)).sum(1)
        tiebreak = torch.zeros(out_features, device=device).index_put_((row_ids,), magnitude.sum(1))
        alive = neurons_kept(counts, max(1, int(min_salient * (budget // out_features))),
                             math.ceil(budget / fan_in), tiebreak)
        new_k = spread_fan_in(budget, int(alive.sum()), fan_in, k_multiple)

    # drop: the n_keep largest magnitudes of the survivors, then at most new_k per neuron
    surviving = alive[row_ids].unsqueeze(1)  # (R, 1)
    scores = torch.where(surviving, magnitude, -torch.inf)
    kept = top_mask(scores, min(n_keep, int(surviving.sum()) * k))
    over = kept.sum(1) > new_k
    if bool(over.any()):
        kept[over] &= top_per_row(torch.where(kept[over], scores[over], -torch.inf),
                                  torch.full((int(over.sum()),), new_k, device=device))

    # grow: each neuron (each group of M inputs) refills its quota among the positions not kept
    kept_dense = _on_rows(row_ids, idx, kept, out_features, fan_in)  # (O, C)
    if generator is not None:
        score = torch.rand(out_features, fan_in, generator=generator).to(device)
    elif gradient is not None:
        score = gradient
    else:
        raise ValueError("regrowing by gradient needs dL/dW; give a generator to regrow at random")
    score = score.masked_fill(kept_dense, -torch.inf)
    if n_m is None:
        quota = torch.where(alive, new_k, 0) - kept_dense.sum(1)
        grown = top_per_row(score, quota)
    else:
        n, m = n_m
        groups = kept_dense.view(-1, m)
        grown = top_per_row(score.view(-1, m), n - groups.sum(1)).view(out_features, fan_in)
    mask = kept_dense | grown

    new_rows = alive.nonzero().view(-1)
    new_idx = mask[new_rows].nonzero()[:, 1].view(new_rows.numel(), new_k)  # row-major: ascending per row
    slot_map = old_slots(row_ids, idx, new_rows, new_idx, out_features)
    new_values = torch.where(slot_map >= 0, values.detach().reshape(-1)[slot_map.clamp_min(0)],
                             torch.zeros((), dtype=values.dtype, device=device))
    return Topology(new_values, new_idx, None if new_rows.numel() == out_features else new_rows, slot_map,
                    ablated=out_features - new_rows.numel(), grown=int((slot_map < 0).sum()))


def old_slots(old_rows: torch.Tensor, old_idx: torch.Tensor, new_rows: torch.Tensor, new_idx: torch.Tensor,
               out_features: int) -> torch.Tensor:
    """For every new entry, its flat slot in the old (R x k) values, or -1 (a binary search per row)."""
    kept_rows, k = old_idx.shape
    ordered, order = old_idx.sort(dim=1)
    slots = torch.arange(kept_rows, device=old_idx.device).unsqueeze(1) * k + order  # (R, k), sorted by input
    position = torch.full((out_features,), -1, dtype=torch.long, device=old_idx.device)
    position[old_rows] = torch.arange(kept_rows, device=old_idx.device)
    where = position[new_rows]  # (R',) -1: the neuron had no weights
    row = where.clamp_min(0)
    found_at = torch.searchsorted(ordered[row], new_idx).clamp_max(k - 1)
    hit = (ordered[row].gather(1, found_at) == new_idx) & (where >= 0).unsqueeze(1)
    return torch.where(hit, slots[row].gather(1, found_at), -1)
