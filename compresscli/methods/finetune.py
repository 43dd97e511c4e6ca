"""Recovery training: distillation from the original model, plus cross-entropy when labels exist,
on the shared training loop (training/loop.py). Compressed layers keep their structure (masks, shared
memories) because the structure lives in the modules' forward, so only the kept values learn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compresscli.model.architecture import detect
from compresscli.core.errors import StageError
from compresscli.methods.cost import Workload
from compresscli.methods.base import MethodConfig, StageContext, check_training, register_method
from compresscli.training.loop import TrainConfig, train


@dataclass
class FinetuneConfig(MethodConfig):
    method = "finetune"
    block_by_block_params = None
    default_targets = ()  # no targets: every parameter of the model trains
    compresses = False
    steps: int = 200  # optimiser steps (batches drawn cyclically from the train split)
    lr: float = 1.0e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled decay
    warmup: float = 0.05  # fraction of steps with linear warm-up
    temperature: float = 2.0  # softening of logits for the KL term
    label_weight: float = 0.5  # weight of the label cross-entropy (when the data has labels); 1 - it for distillation
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables

    def __post_init__(self) -> None:
        check_training(self)
        if not 0 <= self.label_weight <= 1:
            raise StageError(f"label_weight must be in [0, 1], got {self.label_weight}")
        if not self.temperature > 0:
            raise StageError(f"temperature must be > 0, got {self.temperature}")

    def needs_original(self) -> bool:
        return self.steps > 0

    def working_bytes(self, work: Workload) -> int:
        """Gradients and AdamW moments of every parameter, and autograd's activations for a batch."""
        return work.optimiser(work.model_bytes) + work.activations() if self.steps > 0 else 0

    def whole_model_only(self) -> str | None:
        return "finetune trains the whole model at once; drop the stage to compress block by block"


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def recover(model: nn.Module, params: list[nn.Parameter], config: FinetuneConfig, ctx: StageContext) -> dict[str, Any]:
    """Train `params` of `model` to match `ctx.teacher` on `ctx.train`. Returns loss statistics."""
    if config.steps == 0 or ctx.dry_run:
        return {"steps": 0}
    if not ctx.train:
        raise StageError("fine-tuning needs training data, but the train split is empty")
    task, teacher, device = ctx.task, ctx.teacher, ctx.device

    def loss(modules: list[nn.Module], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        batch = _to(batch, device)
        with torch.no_grad():
            target = task.outputs(teacher, batch)
        out = task.outputs(modules[0], batch)
        value = task.distill_loss(out, target, batch, config.temperature)
        label_loss = task.label_loss(out, batch)
        if label_loss is not None:
            value = (1 - config.label_weight) * value + config.label_weight * label_loss
        return value, None

    model.train()
    try:
        return train(params, ctx.train, loss, TrainConfig(config.steps, config.lr, config.weight_decay, config.warmup,
                                                          config.max_grad_norm),
                     device, ctx.seed, ctx.progress, "fine-tune",
                     fix=f"lower finetune lr (now {config.lr:g}) or check the data", modules=[model],
                     units=[model.get_submodule(b.name) for b in detect(model).blocks] if ctx.shard else (),
                     shard=ctx.shard)
    finally:
        model.eval()


@register_method(FinetuneConfig, "recovery training by distillation from the original (+ labels when present)")
def finetune(model: nn.Module, selected: dict[str, nn.Module], config: FinetuneConfig,
             ctx: StageContext) -> dict[str, Any]:
    """With no targets every parameter trains; with targets, only the parameters of those layers."""
    params = list({id(p): p for m in selected.values() for p in m.parameters()}.values()) or list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return recover(model, params, config, ctx)
