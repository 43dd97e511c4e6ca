"""Block-wise reconstruction: each compressed block, fed the inputs the calibrator gives it (the
original model's input to that block, or in the block-by-block engine the already-compressed blocks'
output), learns to reproduce the original block's output on them (MSE), all blocks at once (sum of
block losses).

Nothing here knows about FiPS: the caller names the blocks and the parameters that learn, and may pass
StepHooks (FiPS uses them for its mask updates). Benchmarks reuse it for baselines.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..blockstream import first_tensor
from ..calibration import BlockIO, move
from ..errors import DivergedError
from ..finetune import lr_factor
from .base import StageContext



@dataclass
class ReconstructionConfig:
    steps: int = 200  # optimiser steps, one chunk of calibration examples each
    lr: float = 1.0e-3  # peak learning rate (AdamW, linear warm-up then cosine decay)
    weight_decay: float = 0.0  # AdamW decoupled decay
    warmup: float = 0.05  # fraction of steps with linear warm-up
    batch_size: int = 8  # calibration examples per step (calibration batches are split, never merged)


class StepHooks:
    """Called around every optimiser step; the default does nothing."""

    def before_forward(self, step: int) -> None:
        pass

    def after_backward(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def block_loss(block: nn.Module, io: BlockIO, device: torch.device) -> torch.Tensor:
    """MSE between the block's output on the original input and the original output (real tokens only)."""
    out = first_tensor(block(*move(io.args, device), **move(io.kwargs, device))).float()
    diff = (out - io.target.to(device).float()).pow(2)  # (B, T, C) or (B, C)
    if io.token_mask is None:
        return diff.mean()
    mask = io.token_mask.to(device).unsqueeze(-1).to(diff.dtype)  # (B, T, 1)
    return (diff * mask).sum() / (mask.sum() * diff.shape[-1]).clamp_min(1.0)


def reconstruct(model: nn.Module, block_names: list[str], params: list[nn.Parameter], ctx: StageContext,
                config: ReconstructionConfig, hooks: StepHooks | None = None) -> dict[str, Any]:
    """Train `params` so every block of `block_names` reproduces the original's (ctx.teacher) output."""
    hooks = hooks or StepHooks()
    if ctx.calibrator is None:
        raise ValueError("block-wise reconstruction needs calibration data, but none was given (pass --data)")
    device = ctx.device
    with ctx.progress.task("capturing block inputs"):
        data = ctx.calibrator.block_io(block_names, config.batch_size)
    blocks = [model.get_submodule(name) for name in block_names]
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = int(config.warmup * config.steps)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    generator = torch.Generator().manual_seed(ctx.seed)
    order: list[int] = []
    losses: list[float] = []
    per_block = torch.zeros(len(blocks))
    was_training = model.training
    model.eval()  # dropout off: the targets come from the original in eval mode
    try:
        with ctx.progress.task("fips reconstruction", total=config.steps) as bar:
            for step in range(config.steps):
                if not order:
                    order = torch.randperm(len(data), generator=generator).tolist()
                chunk = data[order.pop()]
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, config.steps, warmup_steps)
                hooks.before_forward(step)
                with autocast:
                    terms = [block_loss(block, io, device) for block, io in zip(blocks, chunk)]
                loss = torch.stack(terms).sum()
                if not torch.isfinite(loss):
                    raise DivergedError(f"block-wise reconstruction diverged at step {step} (loss {loss.item()})",
                                        f"lower the reconstruction lr (now {config.lr:g}); nothing was written")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                hooks.after_backward(step, optimizer)
                optimizer.step()
                hooks.after_step(step)
                losses.append(loss.item())
                if step >= config.steps - max(1, config.steps // 10):
                    per_block += torch.tensor([t.item() for t in terms])
                bar.advance(1, loss=losses[-1])
        hooks.finish()
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(trainable.get(id(p), False))
    tail = max(1, config.steps // 10)
    return {"steps": config.steps, "chunks": len(data), "first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-tail:]) / tail if losses else None,
            "final_block_loss": [round(x / tail, 6) for x in per_block.tolist()]}
