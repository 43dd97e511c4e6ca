"""Block-wise reconstruction: each compressed block, fed the original model's input to that block,
learns to reproduce the original block's output (MSE), all blocks at once (sum of block losses).

The inputs are captured with forward pre-hooks (with_kwargs=True) on the original model's blocks, so
any block signature works (BERT's attention masks, Llama's position embeddings, a ViT's plain x).
Nothing here knows about FiPS: the caller names the blocks and the parameters that learn, and may pass
StepHooks (FiPS uses them for its mask updates). Benchmarks reuse it for baselines.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import DivergedError
from ..finetune import lr_factor
from .base import StageContext

Batch = dict[str, torch.Tensor]


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


@dataclass
class BlockIO:
    args: tuple
    kwargs: dict[str, Any]
    target: torch.Tensor  # the original block's output
    token_mask: torch.Tensor | None  # (B, T) real tokens, when the output is (B, T, C) text


def split_batches(batches: list[Batch], size: int) -> list[Batch]:
    """Chunks of at most `size` examples; text chunks lose the padding columns no example in them needs."""
    chunks = []
    for batch in batches:
        n = len(next(iter(batch.values())))
        for start in range(0, n, size):
            chunk = {k: v[start:start + size] for k, v in batch.items()}
            mask = chunk.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                used = mask.any(0).nonzero()
                end = int(used.max()) + 1 if len(used) else mask.shape[1]
                chunk = {k: v[:, :end] if v.shape[:2] == mask.shape else v for k, v in chunk.items()}
            chunks.append(chunk)
    return chunks


def _move(obj: Any, device: torch.device | str, memo: dict[int, tuple] | None = None) -> Any:
    """Tensors inside args/kwargs copied (detached) to `device`, so a block that writes into its input
    cannot alter the cache; caches are dropped, so blocks never append to them."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.detach().to(device, copy=True)
        key = id(obj)  # one copy of a tensor several blocks read (the hidden state, the attention mask)
        if key not in memo:
            memo[key] = (obj, obj.detach().to(device, copy=True))
        return memo[key][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: (False if k == "use_cache" else _move(v, device, memo)) for k, v in obj.items()}
    if "Cache" in type(obj).__name__:
        return None
    return obj


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture(teacher: nn.Module, block_names: list[str], task, chunks: list[Batch],
            device: torch.device) -> list[list[BlockIO]]:
    """Per chunk, per block: the original block's inputs and output, stored on the CPU."""
    blocks = [teacher.get_submodule(name) for name in block_names]
    captured: list[list[BlockIO]] = []
    for chunk in chunks:
        memo: dict[int, tuple] = {}
        inputs: dict[int, tuple] = {}
        outputs: dict[int, torch.Tensor] = {}
        handles = []
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, a, kw, i=i: inputs.__setitem__(i, (_move(a, "cpu", memo), _move(kw, "cpu", memo))),
                with_kwargs=True))
            handles.append(block.register_forward_hook(
                lambda m, a, out, i=i: outputs.__setitem__(i, _move(_first(out), "cpu", memo))))
        try:
            task.outputs(teacher.eval(), {k: v.to(device) for k, v in chunk.items()})
        finally:
            for handle in handles:
                handle.remove()
        mask = chunk.get("attention_mask")
        captured.append([BlockIO(*inputs[i], outputs[i],
                                 mask if mask is not None and outputs[i].shape[:2] == mask.shape else None)
                         for i in range(len(blocks))])
    return captured


def block_loss(block: nn.Module, io: BlockIO, device: torch.device) -> torch.Tensor:
    """MSE between the block's output on the original input and the original output (real tokens only)."""
    out = _first(block(*_move(io.args, device), **_move(io.kwargs, device))).float()
    diff = (out - io.target.to(device).float()).pow(2)  # (B, T, C) or (B, C)
    if io.token_mask is None:
        return diff.mean()
    mask = io.token_mask.to(device).unsqueeze(-1).to(diff.dtype)  # (B, T, 1)
    return (diff * mask).sum() / (mask.sum() * diff.shape[-1]).clamp_min(1.0)


def reconstruct(model: nn.Module, block_names: list[str], params: list[nn.Parameter], ctx: StageContext,
                config: ReconstructionConfig, hooks: StepHooks | None = None) -> dict[str, Any]:
    """Train `params` so every block of `block_names` reproduces the original's (ctx.teacher) output."""
    hooks = hooks or StepHooks()
    if not ctx.calibration:
        raise ValueError("block-wise reconstruction needs calibration data, but none was given (pass --data)")
    device = ctx.device
    with ctx.progress.task("capturing block inputs"):
        data = capture(ctx.teacher, block_names, ctx.task, split_batches(ctx.calibration, config.batch_size), device)
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
