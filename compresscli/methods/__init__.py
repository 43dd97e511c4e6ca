"""Compression methods: each module here registers a config dataclass and a handler (see base.py).

Every module of this package is imported, so a new method file registers itself by existing.
"""
import importlib
import pkgutil

from compresscli.methods.base import METHODS, MethodConfig, StageContext, compress_

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "MethodConfig", "StageContext", "compress_"]
