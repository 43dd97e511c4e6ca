"""Reading safetensors defensively and writing output directories atomically."""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .errors import CheckpointError

_FIX = "re-export it, or point at an intact copy"


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Tensor entries and `__metadata__` from the header alone, after checking the file is whole.

    Checks what the safetensors loader would only discover lazily: that the header parses and that
    every tensor's byte range lies inside the file (a truncated download fails here, by name).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}", "check the path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"corrupt safetensors file {path} (shorter than its 8-byte header length)", _FIX)
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise CheckpointError(f"corrupt safetensors file {path} (header length {header_len} exceeds the file)", _FIX)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"corrupt safetensors file {path} (header is not JSON: {err})", _FIX) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors file {path} (header is not a JSON object)", _FIX)
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - header_len
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"corrupt safetensors file {path} (entry {name!r} has no data offsets)", _FIX) from None
        if not 0 <= start <= end <= data_len:
            raise CheckpointError(
                f"truncated safetensors file {path}: tensor {name!r} ends at byte {end} but the data holds {data_len}", _FIX)
    return header, metadata


def read_tensors(path: Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata, with any decoding failure reported as a corrupt file."""
    _, metadata = read_header(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as err:  # the library raises several types for a damaged file
        raise CheckpointError(f"corrupt safetensors file {path} ({err})", _FIX) from None


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; it becomes `out` only if the block completes.

    On any exception (Ctrl-C included) the temporary directory is removed and `out` is untouched,
    so a failed run never leaves a half-written checkpoint.
    """
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"output {out} already exists", "choose another --out, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should look like any other directory
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
