"""One training loop for every recovery stage: `finetune` (distillation on the train split) and
`reconstruct` (block outputs on calibration chunks, also FiPS's own reconstruction).

AdamW with linear warm-up and cosine decay, bf16 autocast on CUDA, items drawn in a seeded random
order (every item once per pass), optional gradient clipping, hooks around each step, and a NaN/inf
loss stops the run with DivergedError (nothing gets written). The reported loss is averaged over the
last tenth of the steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import DivergedError
from .progress import Progress, SilentProgress


@dataclass
class TrainConfig:
    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps with linear warm-up
    max_grad_norm: float = 0.0  # 0: no clipping


class StepHooks:
    """Called around every optimiser step; the default does nothing (FiPS's mask schedule overrides it)."""

    def before_forward(self, step: int) -> None:
        pass

    def after_backward(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


Loss = Callable[[Any], tuple[torch.Tensor, list[torch.Tensor] | None]]  # item -> (loss, its terms or None)


def train(params: list[nn.Parameter], items: Sequence[Any], loss_fn: Loss, config: TrainConfig,
          device: torch.device, seed: int = 0, progress: Progress | None = None, label: str = "training",
          hooks: StepHooks | None = None, fix: str = "lower the lr") -> dict[str, Any]:
    """Train `params` for config.steps steps, one item per step. Returns the loss statistics (and, when
    the loss has terms, each term averaged over the last tenth of the steps)."""
    progress, hooks = progress or SilentProgress(), hooks or StepHooks()
    if config.steps == 0:
        return {"steps": 0}
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = int(config.warmup * config.steps)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    generator = torch.Generator().manual_seed(seed)
    tail = max(1, config.steps // 10)
    order: list[int] = []
    losses: list[float] = []
    term_sums: torch.Tensor | None = None
    with progress.task(label, total=config.steps) as bar:
        for step in range(config.steps):
            if not order:
                order = torch.randperm(len(items), generator=generator).tolist()
            item = items[order.pop()]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, config.steps, warmup_steps)
            hooks.before_forward(step)
            with autocast:
                loss, terms = loss_fn(item)
            if not torch.isfinite(loss):
                raise DivergedError(f"{label} diverged at step {step} (loss {loss.item()})", f"{fix}; nothing was written")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hooks.after_backward(step, optimizer)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            hooks.after_step(step)
            losses.append(loss.item())
            if terms is not None and step >= config.steps - tail:
                values = torch.tensor([t.item() for t in terms])
                term_sums = values if term_sums is None else term_sums + values
            bar.advance(1, loss=losses[-1])
    optimizer.zero_grad(set_to_none=True)  # no gradient outlives the loop
    hooks.finish()
    stats = {"steps": config.steps, "first_loss": losses[0], "final_loss": sum(losses[-tail:]) / tail}
    if term_sums is not None:
        stats["final_terms"] = [round(x / tail, 6) for x in term_sums.tolist()]
    return stats
