"""Inputs shaped as a model reads them, made up: for the reload check when no data was loaded, for timing,
for probing the memory a forward takes."""
from __future__ import annotations

import torch
from torch import nn

from compresscli.model.tasks import Batch, Task


def image_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model reads. timm models built with img_size/in_chans arguments keep their
    architecture's default pretrained_cfg, so the patch embedding is asked first."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    proj = getattr(embed, "proj", None)
    if size is not None and hasattr(proj, "in_channels"):  # a Conv2d, or a compressed one (condensed, RPS)
        return (proj.in_channels, *tuple(size))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    config = getattr(model, "config", None)
    side = getattr(config, "image_size", 224)
    return (getattr(config, "num_channels", 3), side, side)


def synthetic_batch(model: nn.Module, task: Task, batch_size: int, seq_len: int = 16,
                    input_size: tuple[int, int, int] | None = None, seed: int = 0) -> Batch:
    """Inputs shaped as the model reads them: random pixels of `input_size` (C, H, W; default:
    `image_input_size(model)`), or `seq_len` random token ids per sequence."""
    generator = torch.Generator().manual_seed(seed)
    if task.modality == "image":
        size = tuple(input_size) if input_size is not None else image_input_size(model)
        return {"pixel_values": torch.randn(batch_size, *size, generator=generator)}
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    ids = torch.randint(min(999, vocab - 1), vocab, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
