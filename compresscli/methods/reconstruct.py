"""Block-wise reconstruction, the `reconstruct` recovery stage (and FiPS's own reconstruction).

Each targeted block, fed the inputs the calibrator gives it (in a whole-model run the original model's
input to that block; block by block, by default, the already-compressed blocks' output), learns to
reproduce the original block's output on those inputs (MSE over real tokens), all blocks at once
(sum of block losses; blocks share no parameter, so this is the same as one block at a time). Masks
and codecs are kept: the structure lives in the compressed layers' forward, so only what they store
learns (and condensed layers built with a mask schedule also move which inputs they read,
condensed_dst.py). It recovers far faster than distillation through the whole model, and needs no more
than one block in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compresscli.model.architecture import detect
from compresscli.methods.calibration import BlockIO, move
from compresscli.training.distributed import examples_in
from compresscli.methods.calibration import first_tensor
from compresscli.core.errors import StageError
from compresscli.methods.cost import Workload
from compresscli.codecs import CompressedModule
from compresscli.model.tasks import compute_dtype
from compresscli.training.loop import StepHooks, TrainConfig, train
from compresscli.methods.base import MethodConfig, StageContext, check_training, register_method
from compresscli.methods.condensed_dst import dynamic_sparsity


@dataclass
class ReconstructConfig(MethodConfig):
    method = "reconstruct"
    default_targets = ("blocks",)  # every block holding a targeted module is reconstructed
    compresses = False
    prefers_block_by_block = True  # the original block outputs come from the weights read, no frozen copy
    steps: int = 200  # optimiser steps, one calibration chunk each
    lr: float = 5.0e-4  # peak learning rate (AdamW, linear warm-up, cosine decay); measured on MiniLM, see CHANGELOG
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps with linear warm-up
    batch_size: int = 8  # calibration examples per step (calibration batches are split, never merged)
    train: Literal["block", "compressed"] = "block"  # every parameter of the block, or only its compressed layers'

    def __post_init__(self) -> None:
        check_training(self)

    def needs_data(self) -> bool:
        return self.steps > 0

    def needs_original(self) -> bool:
        return self.steps > 0

    def calibration_chunk(self) -> int | None:
        return self.batch_size

    def working_bytes(self, work: Workload) -> int:
        """The optimiser over the blocks' parameters, autograd's activations for a chunk through them, and
        (whole-model runs) the captured block inputs and outputs."""
        if self.steps == 0:
            return 0
        total = work.optimiser(work.model_bytes) + work.activations(self.batch_size * work.seq_len)
        if work.captures:
            total += 2 * work.calibration_tokens * work.width * work.value_bytes * work.blocks
        return total

    def training(self) -> TrainConfig:
        return TrainConfig(self.steps, self.lr, self.weight_decay, self.warmup)


def block_loss(block: nn.Module, io: BlockIO, device: torch.device) -> torch.Tensor:
    """MSE between the block's output on its input and the original block's output (real tokens only)."""
    dtype = compute_dtype(block)
    out = first_tensor(block(*move(io.args, device, dtype=dtype), **move(io.kwargs, device, dtype=dtype))).float()
    diff = (out - io.target.to(device).float()).pow(2)  # (B, T, C) or (B, C)
    if io.token_mask is None:
        return diff.mean()
    mask = io.token_mask.to(device).unsqueeze(-1).to(diff.dtype)  # (B, T, 1)
    return (diff * mask).sum() / (mask.sum() * diff.shape[-1]).clamp_min(1.0)


def real_tokens(chunk: list[BlockIO]) -> float:
    """A chunk's share of the loss when data-parallel ranks split it: block_loss averages over real
    tokens, so weighting each rank's shard by its real tokens gives exactly the loss of the whole chunk."""
    io = chunk[0]
    return float(io.token_mask.sum()) if io.token_mask is not None else float(examples_in(io.target))


def reconstruct(model: nn.Module, block_names: list[str], params: list[nn.Parameter], ctx: StageContext,
                config: TrainConfig, batch_size: int, hooks: StepHooks | None = None,
                label: str = "block-wise reconstruction") -> dict[str, Any]:
    """Train `params` so every block of `block_names` reproduces the original block's output."""
    if ctx.calibrator is None:
        raise StageError("block-wise reconstruction needs calibration data, but none was given (pass --data)")
    device = ctx.device
    with ctx.progress.task("capturing block inputs"):
        data = ctx.calibrator.block_io(block_names, batch_size)
    blocks = [model.get_submodule(name) for name in block_names]
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    was_training = model.training
    model.eval()  # dropout off: the targets come from the original in eval mode

    def loss(modules: list[nn.Module], chunk: list[BlockIO]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        terms = [block_loss(block, io, device) for block, io in zip(modules, chunk)]
        return torch.stack(terms).sum(), terms

    try:
        stats = train(params, data, loss, config, device, ctx.seed, ctx.progress, label, hooks,
                      fix=f"lower the reconstruction lr (now {config.lr:g})", weight=real_tokens, modules=blocks,
                      shard=ctx.shard)
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(trainable.get(id(p), False))
    stats["chunks"] = len(data)
    stats["final_block_loss"] = stats.pop("final_terms", [])
    return stats


def targeted_blocks(model: nn.Module, selected: dict[str, nn.Module]) -> list[str]:
    """Names of the blocks that hold (or are) a selected module, in model order."""
    blocks = [b.name for b in detect(model).blocks]
    chosen = [b for b in blocks if any(n == b or n.startswith(b + ".") or b.startswith(n + ".") for n in selected)]
    if not chosen:
        raise StageError(f"the targets lie in no transformer block ({', '.join(list(selected)[:3])}); reconstruct "
                         "works block by block (targets: [blocks])")
    return chosen


@register_method(ReconstructConfig, "block-wise reconstruction: each targeted block learns to reproduce the original "
                                    "block's output on calibration data (masks and codecs kept)")
def reconstruct_stage(model: nn.Module, selected: dict[str, nn.Module], config: ReconstructConfig,
                      ctx: StageContext) -> dict[str, Any]:
    names = targeted_blocks(model, selected)
    if config.steps == 0 or ctx.dry_run:
        return {"blocks": len(names), "steps": 0}
    modules = [model.get_submodule(n) for n in names]
    if config.train == "compressed":
        modules = [m for block in modules for m in block.modules() if isinstance(m, CompressedModule)]
        if not modules:
            raise StageError("train: compressed, but the targeted blocks hold no compressed layer; put reconstruct "
                             "after a compression stage, or use train: block")
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    trained = sum(p.numel() for p in params)
    masks = dynamic_sparsity(model, params, config.steps, ctx.seed)
    stats = reconstruct(model, names, params, ctx, config.training(), config.batch_size, masks)
    return {"blocks": len(names), "trained_parameters": trained, **stats, **(masks.summary() if masks else {})}
