"""Compressed layer types. Each one knows its exact storage codec and nothing about the method that made it."""
from .base import CODECS, Codec, CompressedModule, codec_for
from .sparse import SparseConv2d, SparseLinear

__all__ = ["CODECS", "Codec", "CompressedModule", "codec_for", "SparseConv2d", "SparseLinear"]
