"""When sparsity masks change during a recovery stage and by how much, shared by FiPS's RigL (fips_masks.py)
and condensed's dynamic sparse training (condensed_dst.py), and the selections both make.

RigL / SRigL's schedule: an update every `every` steps, strictly between step 0 and `end` =
round(until * steps) (after it the masks stay fixed so the values settle); the fraction of the active
weights dropped and regrown at step t decays on a cosine, drop_fraction / 2 * (1 + cos(pi * t / end)).

The selections are exact and deterministic (the largest first, ties to the lower position): data-parallel
ranks holding the same gradient then choose the same masks without exchanging them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UpdateSchedule:
    every: int  # steps between updates
    until: float  # fraction of the steps after which the masks stay fixed
    drop_fraction: float  # fraction of the active weights dropped (and regrown) at the first update

    def end(self, steps: int) -> int:
        """The first step after which the masks stay fixed."""
        return max(1, round(self.until * steps))

    def updating(self, step: int, steps: int) -> bool:
        return 0 < step < self.end(steps) and step % self.every == 0

    def fraction(self, step: int, steps: int) -> float:
        end = self.end(steps)
        return 0.5 * self.drop_fraction * (1.0 + math.cos(math.pi * min(step, end) / end))


def top_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the n largest entries of `scores` (taken flat), ties to the lower position: a
    selection (kthvalue) and one pass over the ties, not a sort."""
    flat = scores.reshape(-1)
    if n <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if n >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, flat.numel() - n + 1).values  # the n-th largest
    above = flat > threshold
    ties = flat == threshold
    return (above | (ties & (ties.cumsum(0) <= n - int(above.sum())))).view(scores.shape)


def top_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask of the counts[r] largest entries of every row r of `scores` (rows x columns), ties to the
    lower position: one topk of the largest count, then one pass over each row's ties."""
    counts = counts.clamp(0, scores.shape[1])
    most = int(counts.max()) if counts.numel() else 0
    if most == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    top = torch.topk(scores, most, dim=1, sorted=True).values  # (rows, most), descending
    threshold = top.gather(1, (counts - 1).clamp_min(0).unsqueeze(1))  # each row's counts[r]-th largest
    wanted = counts.unsqueeze(1) > 0
    above = (scores > threshold) & wanted
    ties = (scores == threshold) & wanted
    room = (counts - above.sum(1)).unsqueeze(1)
    return above | (ties & (ties.cumsum(1) <= room))
