"""Recovery training: distillation from the original model, plus cross-entropy when labels exist,
on the shared training loop (training/loop.py). Compressed layers keep their structure (masks, shared
memories) because the structure lives in the modules' forward, so only the kept values learn; condensed
layers built with a mask schedule (`update: rigl | set`) also move which inputs they read
(condensed_dst.py). `aux: penultimate` adds the auxiliary objective sparse output heads need
(penultimate.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compresscli.model.architecture import detect
from compresscli.core.errors import StageError
from compresscli.methods.cost import Workload
from compresscli.methods.base import MethodConfig, StageContext, check_training, register_method
from compresscli.methods.condensed_dst import dynamic_sparsity
from compresscli.methods.penultimate import PenultimateDistillation
from compresscli.training.loop import HookChain, StepHooks, TrainConfig, train


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
    aux: Literal["none", "penultimate"] = "none"  # penultimate: also distil the output head's input (sparse heads)
    aux_weight: float = 1.0  # the auxiliary term's weight at the first step, cosine-decayed
    aux_until: float = 0.5  # fraction of the steps after which the auxiliary term is off

    def __post_init__(self) -> None:
        check_training(self)
        if not self.aux_weight > 0 or not 0 < self.aux_until <= 1:
            raise StageError(f"aux_weight must be > 0 and aux_until in (0, 1], got {self.aux_weight} and "
                             f"{self.aux_until}", "e.g. aux_weight: 1.0, aux_until: 0.5")
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


def recover(model: nn.Module, params: list[nn.Parameter], config: FinetuneConfig, ctx: StageContext,
            hooks: StepHooks | None = None) -> dict[str, Any]:
    """Train `params` of `model` to match `ctx.teacher` on `ctx.train`. Returns loss statistics."""
    if config.steps == 0 or ctx.dry_run:
        return {"steps": 0}
    if not ctx.train:
        raise StageError("fine-tuning needs training data, but the train split is empty")
    task, teacher, device = ctx.task, ctx.teacher, ctx.device
    aux = None
    if config.aux == "penultimate":
        aux = PenultimateDistillation(model, teacher, config.aux_weight, config.aux_until, config.steps)
        hooks = HookChain(*(h for h in (hooks, aux) if h is not None))

    def loss(modules: list[nn.Module], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        batch = _to(batch, device)
        with torch.no_grad():
            target = task.outputs(teacher, batch)
        out = task.outputs(modules[0], batch)
        value = task.distill_loss(out, target, batch, config.temperature)
        label_loss = task.label_loss(out, batch)
        if label_loss is not None:
            value = (1 - config.label_weight) * value + config.label_weight * label_loss
        extra = aux.term(batch) if aux is not None else None
        return (value if extra is None else value + extra), None

    model.train()
    try:
        return train(params, ctx.train, loss, TrainConfig(config.steps, config.lr, config.weight_decay, config.warmup,
                                                          config.max_grad_norm),
                     device, ctx.seed, ctx.progress, "fine-tune", hooks,
                     fix=f"lower finetune lr (now {config.lr:g}) or check the data", modules=[model],
                     units=[model.get_submodule(b.name) for b in detect(model).blocks] if ctx.shard else (),
                     shard=ctx.shard)
    finally:
        model.eval()
        if aux is not None:  # its hooks sit on the teacher, which later stages use
            aux.finish()


@register_method(FinetuneConfig, "recovery training by distillation from the original (+ labels when present)")
def finetune(model: nn.Module, selected: dict[str, nn.Module], config: FinetuneConfig,
             ctx: StageContext) -> dict[str, Any]:
    """With no targets every parameter trains; with targets, only the parameters of those layers."""
    params = list({id(p): p for m in selected.values() for p in m.parameters()}.values()) or list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    masks = None if ctx.dry_run else dynamic_sparsity(model, params, config.steps, ctx.seed)
    stats = recover(model, params, config, ctx, masks)
    return {**stats, **masks.summary()} if masks is not None else stats
