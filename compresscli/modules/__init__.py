"""Compressed layer types. Each one knows its exact storage codec and nothing about the method that made it.

Every module of this package is imported, so a new layer type registers its codec by existing.
"""
import importlib
import pkgutil

from .base import CODECS, INFERENCE_FORMS, Codec, CompressedModule, codec_for
from .sparse import SparseConv2d, SparseLinear

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["CODECS", "INFERENCE_FORMS", "Codec", "CompressedModule", "codec_for", "SparseConv2d", "SparseLinear"]
