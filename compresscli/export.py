"""A model with compressed layers <-> safetensors tensors plus `__metadata__`, streamed both ways.

Compressed layers are written through their codec; everything else is stored dense under its
state-dict name. Tied tensors (GPT-2's lm_head/wte) are stored once and re-tied on load; tensors
several layers share (a FiPS base, an RPS memory) once under `shared.`. Writing goes layer by layer
into a ShardWriter; reading decodes layer by layer from a TensorIndex, so neither side ever holds
the whole file in memory beside the model. Each shard's metadata describes the layers it holds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CheckpointError
from .modules import CompressedModule, codec_for
from .safetensors_io import ShardWriter, TensorIndex

FORMAT_NAME = "compresscli"
FORMAT_VERSION = "1"
FORMAT_METADATA = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
SHARED_PREFIX = "shared."  # tensors owned by several layers, stored once
_REEXPORT = "the file is incomplete; re-export it"
_MISMATCH = "the config.json does not match the weight files"


def compressed_layers(model: nn.Module) -> dict[str, CompressedModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedModule)}


def layer_metadata(layer: CompressedModule) -> dict[str, Any]:
    return {"shared": sorted(layer.shared_tensors()), "codec": layer.codec.value, "version": layer.codec_version,
            "params": layer.codec_params(), "stored_params": layer.stored_parameters(),
            "dense_shapes": {k: list(v) for k, v in layer.dense_equivalent().items()}}


def write_model(model: nn.Module, writer: ShardWriter, include: Callable[[str], bool] = lambda name: True) -> None:
    """Stream the tensors of `model` whose names `include` accepts (a compressed layer by its module
    name, any other tensor by its state-dict key) into `writer`, one layer or module at a time."""
    layers = {n: m for n, m in compressed_layers(model).items() if include(n)}
    for name, layer in layers.items():
        tensors = {f"{name}.{key}": value for key, value in layer.to_tensors().items()}
        for key, value in layer.shared_tensors().items():
            if f"{SHARED_PREFIX}{key}" not in writer.names:
                tensors[f"{SHARED_PREFIX}{key}"] = value
        writer.add(tensors, {"layers": {name: layer_metadata(layer)}})

    covered = tuple(f"{name}." for name in compressed_layers(model))
    seen: dict[tuple, str] = {}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    tied: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        if key.startswith(covered) or not include(key):
            continue
        if value.is_meta:
            raise ValueError(f"{key} has no data (it is on the meta device); this is a bug in the caller")
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if identity in seen:
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        by_module.setdefault(key.rpartition(".")[0], {})[key] = value
    for module, tensors in by_module.items():
        ties = {dup: kept for dup, kept in tied.items() if kept in tensors}
        writer.add(tensors, {"tied": ties} if ties else None)


def save_model(model: nn.Module, directory: Path, shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """Write `model`'s tensors into `directory` (model.safetensors, or shards with an index)."""
    writer = ShardWriter(Path(directory), shard_bytes, FORMAT_METADATA)
    write_model(model, writer)
    return writer.close()


def read_format(index: TensorIndex, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Every shard's layer metadata and tied names, merged, after checking the format tag and version."""
    layers: dict[str, Any] = {}
    tied: dict[str, str] = {}
    for file, metadata in index.metadata.items():
        if metadata.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{file} is not a compresscli checkpoint (no format tag in its metadata)",
                                  "load it as a Hugging Face or timm checkpoint instead")
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{where} has format version {version}, this compresscli reads {FORMAT_VERSION}",
                                  "upgrade compresscli or re-export the checkpoint")
        try:
            file_layers = json.loads(metadata.get("layers", "{}"))
            file_tied = json.loads(metadata.get("tied", "{}"))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{file}: its metadata is not valid JSON ({err})", _REEXPORT) from None
        if not isinstance(file_layers, dict) or not isinstance(file_tied, dict):
            raise CheckpointError(f"{file}: its metadata is damaged (layers/tied are not objects)", _REEXPORT)
        layers.update(file_layers)
        tied.update(file_tied)
    return layers, tied


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at `name` (dotted path) for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _listed(label: str, items: list[str]) -> str:
    return f"{label} {items[:5]}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


def tensors_to_model(model: nn.Module, index: TensorIndex, where: str, dtype: torch.dtype | None = None,
                     include: Callable[[str], bool] | None = None,
                     shared_cache: dict[str, nn.Parameter] | None = None) -> None:
    """Rebuild the compressed layers inside `model` (a skeleton from config) and assign every other
    tensor, reading one layer at a time. With `include`, only the layers and tensors whose names it
    accepts (a block being streamed); `shared_cache` then keeps tensors several blocks share.

    Never falls back silently: a missing or unexpected tensor is an error that names it.
    """
    layer_meta, tied = read_format(index, where)
    inside = include or (lambda name: True)
    shared = shared_cache if shared_cache is not None else {}
    names = {n for n in index.names() if inside(n) and not n.startswith(SHARED_PREFIX)}
    if include is None:
        listed_shared = {n[len(SHARED_PREFIX):] for n in index.names() if n.startswith(SHARED_PREFIX)}
        wanted_shared = {k for meta in layer_meta.values() for k in meta.get("shared", [])}
        if listed_shared - wanted_shared:
            raise CheckpointError(f"{where}: unexpected shared tensors {sorted(listed_shared - wanted_shared)[:5]}",
                                  _MISMATCH)
    for name, meta in layer_meta.items():
        if not inside(name):
            continue
        try:
            cls = codec_for(meta["codec"])
            version, params = meta.get("version", 1), meta["params"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{where}: the metadata of layer {name} is damaged", _REEXPORT) from None
        if version > cls.codec_version:
            raise CheckpointError(f"{where}: layer {name} uses {meta['codec']} v{version}, "
                                  f"this compresscli reads up to v{cls.codec_version}", "upgrade compresscli")
        expected = {f"{name}.{rel}" for rel in cls.expected_tensors(params)}
        missing = expected - names
        if missing:
            raise CheckpointError(f"{where}: layer {name} ({meta['codec']}) is missing tensors {sorted(missing)}",
                                  _REEXPORT)
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: compressed layer {name} does not exist in the architecture",
                                  _MISMATCH) from None
        wanted = cls.expected_shared(params)
        absent = [k for k in wanted if k not in shared and SHARED_PREFIX + k not in index]
        if absent:
            raise CheckpointError(f"{where}: layer {name} needs shared tensors "
                                  f"{sorted(SHARED_PREFIX + k for k in absent)}", _REEXPORT)
        for key in wanted - set(shared):
            shared[key] = nn.Parameter(index.read([SHARED_PREFIX + key])[SHARED_PREFIX + key])
        own = {k[len(name) + 1:]: v for k, v in index.read(sorted(expected)).items()}
        names -= expected
        layer = cls.from_tensors(own, params, {k: shared[k] for k in wanted})
        replace_module(model, name, layer.to(dtype) if dtype is not None else layer)

    covered = tuple(f"{name}." for name in layer_meta)
    expected_dense = {k for k in model.state_dict() if not k.startswith(covered) and inside(k)}
    missing = sorted(k for k in expected_dense if k not in names and k not in tied)
    unexpected = sorted(names - expected_dense)
    if missing or unexpected:
        parts = ([_listed("missing tensors", missing)] if missing else []) + \
                ([_listed("unexpected tensors", unexpected)] if unexpected else [])
        raise CheckpointError(f"{where}: " + "; ".join(parts), _MISMATCH)
    state = model.state_dict()
    wrong = [f"{k} {index.entries[k].shape}" for k in names if tuple(index.entries[k].shape) != tuple(state[k].shape)]
    if wrong:
        raise CheckpointError(f"{where}: tensor {wrong[0]} does not have the shape the architecture expects "
                              f"{tuple(state[wrong[0].split()[0]].shape)}", _MISMATCH)
    by_module: dict[str, list[str]] = {}
    for key in sorted(names):
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    for keys in by_module.values():
        model.load_state_dict(index.read(keys, dtype), strict=False, assign=True)
    for dup, kept in tied.items():
        if inside(dup):
            module_name, _, attr = dup.rpartition(".")
            kept_module, _, kept_attr = kept.rpartition(".")
            setattr(model.get_submodule(module_name), attr, getattr(model.get_submodule(kept_module), kept_attr))
