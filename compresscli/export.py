"""A model with compressed layers <-> one flat dict of tensors plus `__metadata__`.

Compressed layers are written through their codec; everything else is stored dense under its
state-dict name. Tied tensors (GPT-2's lm_head/wte) are stored once and re-tied on load.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .modules import CompressedModule, codec_for

FORMAT_NAME = "compresscli"
FORMAT_VERSION = "1"
SHARED_PREFIX = "shared."  # tensors owned by several layers, stored once


def compressed_layers(model: nn.Module) -> dict[str, CompressedModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedModule)}


def model_to_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flat tensors and string metadata for `safetensors.torch.save_file`."""
    layers = compressed_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    layer_meta: dict[str, Any] = {}
    for name, layer in layers.items():
        for key, value in layer.to_tensors().items():
            tensors[f"{name}.{key}"] = value
        shared = layer.shared_tensors()
        for key, value in shared.items():
            stored = tensors.setdefault(f"{SHARED_PREFIX}{key}", value)
            if stored is not value:
                raise ValueError(f"two different tensors claim the shared name {key!r}")
        layer_meta[name] = {"shared": sorted(shared),"codec": layer.codec.value, "version": layer.codec_version, "params": layer.codec_params(),
                            "stored_params": layer.stored_parameters(),
                            "dense_shapes": {k: list(v) for k, v in layer.dense_equivalent().items()}}

    covered = tuple(f"{name}." for name in layers)
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        if key.startswith(covered):
            continue
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if identity in seen:
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "layers": json.dumps(layer_meta), "tied": json.dumps(tied)}
    return tensors, metadata


def parse_metadata(metadata: dict[str, str], where: str) -> tuple[dict[str, Any], dict[str, str]]:
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where} is not a compresscli checkpoint (no format tag in its metadata)",
                              "load it as a Hugging Face or timm checkpoint instead")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where} has format version {version}, this compresscli reads {FORMAT_VERSION}",
                              "upgrade compresscli or re-export the checkpoint")
    return json.loads(metadata.get("layers", "{}")), json.loads(metadata.get("tied", "{}"))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at `name` (dotted path) for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def tensors_to_model(model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> None:
    """Rebuild compressed layers inside `model` (built from config) and load every other tensor.

    Never falls back silently: a missing or unexpected tensor is an error that names it.
    """
    layer_meta, tied = parse_metadata(metadata, where)
    remaining = dict(tensors)
    shared = {k[len(SHARED_PREFIX):]: nn.Parameter(remaining.pop(k)) for k in list(remaining)
              if k.startswith(SHARED_PREFIX)}
    used_shared: set[str] = set()
    for name, meta in layer_meta.items():
        cls = codec_for(meta["codec"])
        if meta.get("version", 1) > cls.codec_version:
            raise CheckpointError(f"{where}: layer {name} uses {meta['codec']} v{meta['version']}, "
                                  f"this compresscli reads up to v{cls.codec_version}", "upgrade compresscli")
        expected = cls.expected_tensors(meta["params"])
        prefix = f"{name}."
        own = {rel: remaining.pop(prefix + rel) for rel in expected if prefix + rel in remaining}
        missing = expected - set(own)
        if missing:
            raise CheckpointError(f"{where}: layer {name} ({meta['codec']}) is missing tensors "
                                  f"{sorted(prefix + m for m in missing)}", "the file is incomplete; re-export it")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: compressed layer {name} does not exist in the architecture",
                                  "the config.json does not match model.safetensors") from None
        wanted = cls.expected_shared(meta["params"])
        if wanted - set(shared):
            raise CheckpointError(f"{where}: layer {name} needs shared tensors "
                                  f"{sorted(SHARED_PREFIX + k for k in wanted - set(shared))}", "the file is incomplete; re-export it")
        used_shared.update(wanted)
        replace_module(model, name, cls.from_tensors(own, meta["params"], {k: shared[k] for k in wanted}))
    if set(shared) - used_shared:
        raise CheckpointError(f"{where}: unexpected shared tensors {sorted(set(shared) - used_shared)[:5]}",
                              "the config.json does not match model.safetensors")

    covered = tuple(f"{name}." for name in layer_meta)
    expected_dense = {k: v for k, v in model.state_dict().items() if not k.startswith(covered)}
    missing = [k for k in expected_dense if k not in remaining and k not in tied]
    unexpected = [k for k in remaining if k not in expected_dense]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}" + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        raise CheckpointError(f"{where}: " + "; ".join(parts), "the config.json does not match model.safetensors")
    for dup, kept in tied.items():
        remaining.setdefault(dup, remaining[kept])
    for key, value in remaining.items():
        target = expected_dense[key]
        if target.shape != value.shape:
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(value.shape)}, the architecture expects "
                                  f"{tuple(target.shape)}", "the config.json does not match model.safetensors")
    model.load_state_dict(remaining, strict=False)
