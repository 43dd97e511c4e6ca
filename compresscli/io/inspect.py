"""Where the bytes go (`compress inspect`): per-layer memory read from safetensors headers.

Parameter counts are stored parameters (non-zeros for sparse layers); bytes are what the file
holds for the layer, indices and masks included. Both are shown beside the dense equivalent.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from compresscli.core.errors import CheckpointError
from compresscli.io.native import SHARED_PREFIX
from compresscli.io.safetensors import read_header

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class LayerRow:
    name: str
    codec: str  # "dense" or the codec name
    shape: list[int]
    dense_params: int
    stored_params: int  # non-zeros (sparse) / stored values
    bytes: int  # on disk, everything the layer stores
    dense_bytes: int  # the same layer stored densely in its value dtype
    memory_bytes: int  # resident once loaded (compresscli.load: the inference form), from the codec's params

    @property
    def ratio(self) -> float:
        return self.bytes / self.dense_bytes if self.dense_bytes else 1.0


def weight_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise CheckpointError(f"no such file or directory: {path}", "check the path")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors file", "point at a checkpoint directory or a .safetensors file")
    return files


def memory_rows(path: Path, count_nonzeros: bool = True) -> list[LayerRow]:
    """Per-layer rows from the header(s); dense tensors are opened (memory-mapped) only to count zeros."""
    rows: list[LayerRow] = []
    for file in weight_files(path):
        header, metadata = read_header(file)
        layers = json.loads(metadata.get("layers", "{}")) if metadata.get("format") == "compresscli" else {}
        claimed: set[str] = set()
        for name, meta in layers.items():
            own = [k for k in header if k.startswith(name + ".")]
            # a tensor shared by several layers (FiPS base, RPS memory) is counted once, in the first
            # layer that reads it: the same layer whose stored_params count it
            own += [key for key in (SHARED_PREFIX + s for s in meta.get("shared", [])) if key in header
                    and key not in claimed]
            claimed.update(own)
            shapes = meta["dense_shapes"]
            value_bytes = DTYPE_BYTES.get(_value_dtype(header, own), 4)
            dense_params = sum(math.prod(s) for s in shapes.values())
            size = _nbytes(header, own)
            rows.append(LayerRow(name, meta["codec"], shapes.get("weight", next(iter(shapes.values()))), dense_params,
                                 meta["stored_params"], size, dense_params * value_bytes, size + _extra_bytes(meta)))
        modules: dict[str, list[str]] = {}
        for key in header:
            if key not in claimed:
                modules.setdefault(key.rpartition(".")[0] or key, []).append(key)
        nonzeros = _count_nonzeros(file, header) if count_nonzeros else {}
        for module, keys in modules.items():
            weight = next((k for k in keys if k.endswith(".weight")), keys[0])
            params = sum(math.prod(header[k]["shape"]) for k in keys)
            stored = sum(nonzeros.get(k, math.prod(header[k]["shape"])) for k in keys)
            size = _nbytes(header, keys)
            rows.append(LayerRow(module, "dense", header[weight]["shape"], params, stored, size, size, size))
    return rows


def _extra_bytes(meta: dict[str, Any]) -> int:
    """What the layer's inference form holds beyond its stored tensors (0 for a codec this build lacks)."""
    from compresscli.codecs import INFERENCE_FORMS

    if meta["codec"] not in INFERENCE_FORMS:
        return 0
    return INFERENCE_FORMS.get(meta["codec"]).inference_extra_bytes(meta["params"])


def _value_dtype(header: dict, keys: list[str]) -> str:
    """The dtype the layer's dense equivalent is counted in: its float values', or (quantized) its scales'."""
    scales = [k for k in keys if k.endswith(".scales")]
    values = [k for k in keys if k.endswith("values") or k.endswith("weight")]
    return header[(scales or values or keys)[0]]["dtype"]


def _nbytes(header: dict, keys: list[str]) -> int:
    return sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys)


def _count_nonzeros(file: Path, header: dict) -> dict[str, int]:
    """Non-zeros of every tensor, one memory-mapped tensor at a time (a handle kept open would keep every
    page it touched resident: the whole file)."""
    counts = {}
    for key in header:
        with safe_open(str(file), framework="pt") as f:
            counts[key] = int(f.get_tensor(key).count_nonzero())
    return counts


def totals(rows: list[LayerRow], path: Path) -> dict[str, Any]:
    file_bytes = sum(f.stat().st_size for f in weight_files(path))
    dense_bytes = sum(r.dense_bytes for r in rows)
    return {"dense_params": sum(r.dense_params for r in rows), "stored_params": sum(r.stored_params for r in rows),
            "tensor_bytes": sum(r.bytes for r in rows), "dense_bytes": dense_bytes, "file_bytes": file_bytes,
            "memory_bytes": sum(r.memory_bytes for r in rows),
            "ratio": file_bytes / dense_bytes if dense_bytes else 1.0}


def inspect_path(path: Path, count_nonzeros: bool = True) -> dict[str, Any]:
    rows = memory_rows(path, count_nonzeros)
    return {"path": str(path), "layers": [{**asdict(r), "ratio": r.ratio} for r in rows], "totals": totals(rows, path)}


def subset_totals(rows: list[dict[str, Any]], names: set[str]) -> dict[str, Any]:
    """Totals over the named layers only (the targeted weights of a run)."""
    chosen = [r for r in rows if r["name"] in names]
    dense = sum(r["dense_bytes"] for r in chosen)
    actual = sum(r["bytes"] for r in chosen)
    return {"layers": len(chosen), "dense_params": sum(r["dense_params"] for r in chosen),
            "stored_params": sum(r["stored_params"] for r in chosen), "dense_bytes": dense, "actual_bytes": actual,
            "ratio": actual / dense if dense else 1.0}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
