"""`wanda`: one-shot pruning by weight times input activation (Sun, Liu, Bair, Kolter, "A Simple and
Effective Pruning Approach for Large Language Models", 2023): score |W_ij| * ||X_j||_2 on calibration
data, compared within each output row (each row drops its lowest-scored `sparsity` fraction), or within
every group of M inputs (N:M). No weight update, no training. Every row keeps the same count, so
`format: condensed` stores the result in the condensed format and runs it on the condensed kernel.
The activation norms are the ones `condensed`'s `score: activation` uses (activation_stats.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compresscli.core.errors import StageError
from compresscli.methods.cost import Workload
from compresscli.methods.base import MethodConfig, SizeKnob, StageContext, register_method
from compresscli.methods.solvers.one_shot import check_fan_ins, check_n_m, linear_targets, prior_keep, prune_in_order


@dataclass
class WandaConfig(MethodConfig):
    method = "wanda"
    size_knob = SizeKnob("sparsity", 0.0, 0.9999)
    storage_like = "magnitude"
    prefers_block_by_block = True
    sparsity: float = 0.5  # fraction of each row's weights removed
    n_m: list[int] | None = None  # [N, M]: keep N of every M consecutive inputs (e.g. [2, 4])
    format: Literal["auto", "bitmask", "csr", "condensed"] = "auto"  # condensed: the condensed kernel

    def __post_init__(self) -> None:
        check_n_m(self.n_m)
        if self.n_m is not None:
            self.sparsity = 1 - self.n_m[0] / self.n_m[1]
        if not 0.0 <= self.sparsity < 1.0:
            raise StageError(f"sparsity must be in [0, 1) (the fraction removed), got {self.sparsity}")

    def working_bytes(self, work: Workload) -> int:
        """The largest layer's float scores and its per-row top-k."""
        return int(work.largest_layer * (4 + 12 * self.sparsity))

    def resident_bytes(self, work: Workload) -> int:
        if self.format == "condensed":
            return int((1 - self.sparsity) * work.weights * (work.value_bytes + 2)) - work.weights * work.value_bytes
        return work.weights


def wanda_keep(weight: torch.Tensor, norms: torch.Tensor, sparsity: float, n_m: list[int] | None,
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """The keep mask: per row the highest |W| * ||X||, or per group of M the highest N. Weights pruned
    before rank lowest and are never revived."""
    score = weight.detach().abs().float() * norms.to(weight.device).unsqueeze(0)  # (rows, in)
    if keep is not None:
        score = torch.where(keep, score, torch.full_like(score, -1.0))
    rows, cols = score.shape
    drop = torch.zeros_like(score, dtype=torch.bool)
    if n_m is not None:
        n, m = n_m
        grouped = score.view(rows, cols // m, m)
        drop.view(rows, cols // m, m).scatter_(2, torch.topk(grouped, m - n, dim=2, largest=False).indices, True)
    else:
        count = int(cols * sparsity)
        if count:
            drop.scatter_(1, torch.topk(score, count, dim=1, largest=False).indices, True)
    result = ~drop
    return result if keep is None else result & keep


@register_method(WandaConfig, "one-shot pruning by |W| x ||X|| per output row (Wanda), N:M or into the condensed format")
def wanda_stage(model: nn.Module, selected: dict[str, nn.Module], config: WandaConfig,
                ctx: StageContext) -> dict[str, Any]:
    layers = linear_targets(selected)
    check_fan_ins(layers, config.n_m)

    def solve(name: str, layer: nn.Linear, stats) -> tuple[torch.Tensor, torch.Tensor, None]:
        keep = wanda_keep(layer.weight, stats.norms(), config.sparsity, config.n_m, prior_keep(layer))
        return layer.weight.detach() * keep, keep, None

    stats = prune_in_order(model, layers, ctx, solve, config.format, keep_gram=False)
    return {**stats, "n_m": config.n_m, "format": config.format}
