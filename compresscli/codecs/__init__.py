"""The codecs: every compressed layer type, in both of its forms, and the registries that rebuild them on load.

One folder per codec (sparse/, condensed/, fips/, rps/), each with codec.py (what both forms share: the stored
tensors, their checks, the params), training.py (the training form, `register_codec`) and inference.py (the
inference form, `register_inference_form`). A codec never knows which method made it. Every module below is
imported here, so a new codec registers itself by existing.
"""
import importlib
import pkgutil

from compresscli.codecs.base import CODECS, INFERENCE_FORMS, CompressedModule, codec_for

for _info in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
    importlib.import_module(_info.name)

from compresscli.codecs.sparse.training import SparseConv2d, SparseLinear  # noqa: E402  (what most methods build)

__all__ = ["CODECS", "INFERENCE_FORMS", "CompressedModule", "codec_for", "SparseConv2d", "SparseLinear"]
