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


def load(path: str | Path) -> nn.Module:
    """A ready nn.Module (eval mode) from a compressed output directory or any supported source."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(path).model


__all__ = ["METHODS", "CondensedConfig", "FinetuneConfig", "FipsConfig", "LTRConfig", "MagnitudeConfig", "MethodConfig",
           "RPSConfig", "StageContext", "compress_", "load"]
