"""compresscli: compress pretrained checkpoints into truly small safetensors, and say honestly what it cost.

The public API: `load` a compressed output (or any supported checkpoint) as a ready nn.Module, and
`compress_` a model in place with any method's config (every registered method's config is exported
here; `METHODS` lists them). The package's layers are described in ARCHITECTURE.md.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compresscli.core.cpu_isa import avoid_unusable_amx
from compresscli.core.errors import CompressError
from compresscli.core.version import __version__
from compresscli.methods import METHODS, MethodConfig, StageContext, compress_
from compresscli.methods.condensed import CondensedConfig
from compresscli.methods.finetune import FinetuneConfig
from compresscli.methods.fips import FipsConfig
from compresscli.methods.ltr import LTRConfig
from compresscli.methods.magnitude import MagnitudeConfig
from compresscli.methods.reconstruct import ReconstructConfig
from compresscli.methods.rps import RPSConfig
from compresscli.methods.sparsegpt import SparseGPTConfig
from compresscli.methods.wanda import WandaConfig

avoid_unusable_amx()  # before any matmul: oneDNN reads its ISA cap once


def load(path: str | Path, trainable: bool = False, cache: str | None = None,
         device: str | torch.device | None = None) -> nn.Module:
    """A ready nn.Module (eval mode) from a compressed output directory or any supported source.

    Compressed layers come in their inference form: what the file holds and no more, run by the
    kernels, nothing trainable. `trainable=True` gives the training form instead (dense weights and masks,
    trainable memories: for fine-tuning or compressing further). `device` moves the model there (default:
    the CPU). `cache="weights"` keeps the weights RPS layers compute on every call, trading the dense
    layers' bytes for speed: the default on CUDA (`cache="none"` declines), where they are computed here."""
    from compresscli.io.checkpoint import load_checkpoint

    if cache not in (None, "weights", "none"):
        raise CompressError(f"unknown cache {cache!r}", 'use cache="weights", cache="none" or leave it out')
    model = load_checkpoint(path, trainable=trainable).model
    if device is not None:
        model.to(device)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if not trainable and (cache is not None or on_gpu):
        keep = (cache or "weights") == "weights"
        for module in model.modules():
            if hasattr(module, "cache_weights_"):
                module.cache_weights_(keep)
    return model


__all__ = ["METHODS", "CompressError", "CondensedConfig", "FinetuneConfig", "FipsConfig", "LTRConfig",
           "MagnitudeConfig", "MethodConfig", "RPSConfig", "ReconstructConfig", "SparseGPTConfig", "StageContext",
           "WandaConfig", "__version__", "compress_", "load"]
