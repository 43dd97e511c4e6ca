"""compresscli: compress pretrained checkpoints into truly small safetensors, and say honestly what it cost."""
from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path

from torch import nn

from .cpu_isa import avoid_unusable_amx
from .methods import METHODS, MethodConfig, StageContext, compress_
from .methods.condensed import CondensedConfig
from .methods.fips import FipsConfig
from .methods.ltr import LTRConfig
from .methods.magnitude import MagnitudeConfig
from .methods.rps import RPSConfig
from .finetune import FinetuneConfig

avoid_unusable_amx()  # before any matmul: oneDNN reads its ISA cap once


def load(path: str | Path, trainable: bool = False, cache: str | None = None) -> nn.Module:
    """A ready nn.Module (eval mode) from a compressed output directory or any supported source.

    Compressed layers come in their inference form: what the file holds and no more, run by the
    kernels, nothing trainable. `trainable=True` gives the training form instead (dense weights and masks,
    trainable memories: for fine-tuning or compressing further). `cache="weights"` keeps the weights RPS
    layers compute on every call, trading the dense layers' bytes for speed."""
    from .checkpoint import load_checkpoint

    if cache not in (None, "weights"):
        from .errors import CompressError

        raise CompressError(f"unknown cache {cache!r}", 'use cache="weights" or leave it out')
    model = load_checkpoint(path, trainable=trainable).model
    if cache == "weights" and not trainable:
        for module in model.modules():
            if hasattr(module, "cache_weights_"):
                module.cache_weights_()
    return model


__all__ = ["METHODS", "CondensedConfig", "FinetuneConfig", "FipsConfig", "LTRConfig", "MagnitudeConfig", "MethodConfig",
           "RPSConfig", "StageContext", "compress_", "load"]
