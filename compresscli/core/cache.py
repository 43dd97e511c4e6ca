"""Where compresscli keeps what it builds once per machine: compiled kernels, trained reference models,
probe verdicts. $COMPRESSCLI_CACHE, default ~/.cache/compresscli."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESSCLI_CACHE", Path.home() / ".cache" / "compresscli"))
