"""Compression methods: each registers a config dataclass and a handler (see base.py)."""
from . import magnitude  # noqa: F401  (registers the method)
from .. import finetune  # noqa: F401  (the recovery stage registers like a method)
from .base import METHODS, MethodConfig, StageContext, compress_

__all__ = ["METHODS", "MethodConfig", "StageContext", "compress_"]
