"""Lottery Ticket Rewinding for a pretrained checkpoint (Frankle et al. 2020; Renda et al. 2020).

Rounds of: recover with distillation, prune a fraction of the *remaining* weights by magnitude,
rewind the surviving weights to the rewind point (the pretrained weights, or the weights after
`rewind_step` recovery steps of the first round); then a final recovery. Masks only ever shrink.
Stored exactly like `magnitude`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compresscli.core.errors import StageError
from compresscli.methods.finetune import FinetuneConfig, recover
from compresscli.methods.cost import Workload
from compresscli.methods.base import MethodConfig, SizeKnob, StageContext, register_method
from compresscli.methods.magnitude import apply_masks, current_masks, keep_masks, prunable_layers


@dataclass
class LTRConfig(MethodConfig):
    method = "ltr"
    block_by_block_params = None
    size_knob = SizeKnob("sparsity", 0.0, 0.9999)
    storage_like = "magnitude"
    sparsity: float = 0.8  # final fraction of the targeted weights removed
    prune_fraction: float = 0.2  # fraction of the remaining weights removed each round
    rewind_step: int = 0  # 0: rewind to the pretrained weights; k > 0: to the weights after k steps of round 1
    round_steps: int = 100  # recovery steps in each round, before its pruning
    final_steps: int = 200  # recovery steps after the last pruning
    lr: float = 1.0e-4  # peak learning rate of every recovery (AdamW, warm-up + cosine, restarted each round)
    scope: Literal["global", "layer"] = "global"  # magnitude threshold over all targets, or per layer
    format: Literal["auto", "bitmask", "csr"] = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise StageError(f"sparsity must be in [0, 1) (the fraction removed), got {self.sparsity}")
        if not 0.0 < self.prune_fraction < 1.0:
            raise StageError(f"prune_fraction must be in (0, 1), got {self.prune_fraction}")
        if self.round_steps < 0 or self.final_steps < 0:
            raise StageError("round_steps must be >= 0 and final_steps >= 0")
        if not 0 <= self.rewind_step <= self.round_steps:
            raise StageError(f"rewind_step must be in [0, round_steps={self.round_steps}], got {self.rewind_step}")

    def sweep_recovery(self, steps: int, lr: float) -> tuple[dict[str, Any], int]:
        """The whole budget inside the stage, spread over its rounds and the final recovery."""
        rounds = max(1, len(ltr_schedule(self.sparsity, self.prune_fraction)))
        per_round = steps // (rounds + 1)
        return {"round_steps": per_round, "final_steps": steps - rounds * per_round, "lr": lr}, 0

    def needs_original(self) -> bool:
        return True

    def resident_bytes(self, work: Workload) -> int:
        return work.weights  # a bool mask beside each dense weight

    def working_bytes(self, work: Workload) -> int:
        """Fine-tuning's memory and the rewind snapshot of the model (the masks are resident_bytes)."""
        return work.optimiser(work.model_bytes) + work.activations() + work.model_bytes

    def whole_model_only(self) -> str | None:
        return "ltr retrains the whole model between pruning rounds; use magnitude with scope: block instead"


def ltr_schedule(sparsity: float, prune_fraction: float) -> list[float]:
    """Cumulative sparsity after each round: 1 - (1 - f)^k, the last round clipped to `sparsity`."""
    if sparsity == 0:
        return []
    rounds = math.ceil(math.log(1 - sparsity) / math.log(1 - prune_fraction) - 1e-9)
    return [min(sparsity, 1 - (1 - prune_fraction) ** k) for k in range(1, rounds + 1)]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def _rewind(model: nn.Module, snapshot: dict[str, torch.Tensor], layers: dict[str, nn.Module]) -> None:
    for name, param in model.named_parameters():
        param.copy_(snapshot[name])
    for layer in layers.values():
        layer.weight.mul_(layer.mask)


@register_method(LTRConfig, "lottery ticket rewinding: rounds of recover / prune a fraction of the remaining / rewind")
def ltr(model: nn.Module, selected: dict[str, nn.Module], config: LTRConfig, ctx: StageContext) -> dict[str, Any]:
    layers = prunable_layers(selected)
    layers = apply_masks(model, layers, current_masks(layers), config.format)  # sparse layers, masks as they are
    params = list(model.parameters())
    schedule = ltr_schedule(config.sparsity, config.prune_fraction)
    rewind_point = _snapshot(model)
    losses = []
    for k, target in enumerate(schedule):
        steps = config.round_steps
        if k == 0 and config.rewind_step > 0:
            recover(model, params, FinetuneConfig(steps=config.rewind_step, lr=config.lr), ctx)
            rewind_point = _snapshot(model)
            steps -= config.rewind_step
        stats = recover(model, params, FinetuneConfig(steps=steps, lr=config.lr), ctx)
        losses.append(stats.get("final_loss"))
        scores = {n: m.weight.detach().abs() for n, m in layers.items()}
        layers = apply_masks(model, layers, keep_masks(scores, current_masks(layers), target, config.scope),
                             config.format)
        _rewind(model, rewind_point, layers)
    final = recover(model, params, FinetuneConfig(steps=config.final_steps, lr=config.lr), ctx)
    masks = current_masks(layers)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {"layers": len(layers), "rounds": len(schedule), "schedule": [round(s, 4) for s in schedule],
            "round_losses": losses, "final_loss": final.get("final_loss"), "sparsity": 1 - kept / total}
