"""An auxiliary objective of recovery for sparse output heads: distillation of the penultimate
representation (the input of the model's output head), the student's to the original's.

Why. With a fixed fan-in output layer trained by dynamic sparsity, the gradient that reaches the layers
below it is weak and noisy early in training, and convergence suffers the more the larger the output
space; an auxiliary objective that feeds them a dense signal fixes it, if its weight decays and it is
switched off before the end (Ullah et al., "Navigating Extremes: Dynamic Sparsity in Large Output Spaces",
NeurIPS 2024, whose auxiliary is a coarse meta-classifier). Recovery here distils from the original, so the
original's penultimate representation is the dense target at hand. The term is the squared error
relative to the target's mean square (scale-free; padding tokens left out), weighted by `weight` decaying
on a cosine to 0 at `until` of the steps, then off.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compresscli.core.errors import StageError
from compresscli.model.architecture import detect
from compresscli.training.loop import StepHooks


def head_name(model: nn.Module) -> str:
    heads = detect(model).groups["head"]
    if not heads:
        raise StageError("aux: penultimate distils the input of the model's output head, and this model has none "
                         "(lm_head, classifier, head)", "use aux: none")
    return heads[0]


class PenultimateDistillation(StepHooks):
    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float, until: float, steps: int):
        name = head_name(teacher)
        self.weight, self.end = weight, max(1, round(until * steps))
        self.inputs: dict[str, torch.Tensor] = {}
        self.current = 0.0
        self.handles = [model.get_submodule(name).register_forward_pre_hook(self._keeper(role))
                        for role, model in (("student", student), ("teacher", teacher))]

    def _keeper(self, role: str):
        def keep(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.current > 0:
                self.inputs[role] = args[0]
        return keep

    def before_forward(self, step: int) -> None:
        self.current = self.weight * 0.5 * (1 + math.cos(math.pi * step / self.end)) if step < self.end else 0.0
        self.inputs.clear()

    def term(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The weighted auxiliary loss of this step's forward (None once switched off)."""
        if self.current == 0 or len(self.inputs) < 2:
            return None
        student, target = self.inputs.pop("student").float(), self.inputs.pop("teacher").float()
        error, scale = (student - target).pow(2), target.pow(2)
        mask = batch.get("attention_mask")
        if student.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(student.shape[:2]):
            weights = mask.to(student.device, student.dtype).unsqueeze(-1)  # (B, T, 1): real tokens only
            error, scale = error * weights, scale * weights
        return self.current * error.sum() / scale.sum().clamp_min(1e-12)

    def finish(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.inputs.clear()
