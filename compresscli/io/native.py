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

from compresscli.core.errors import CheckpointError
from compresscli.codecs import CompressedModule, codec_for
from compresscli.codecs.base import compressed_layers, replace_module
from compresscli.io.safetensors import ShardWriter, TensorIndex

FORMAT_NAME = "compresscli"
FORMAT_VERSION = "1"
FORMAT_METADATA = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
SHARED_PREFIX = "shared."  # tensors owned by several layers, stored once
_REEXPORT = "the file is incomplete; re-export it"
_DAMAGED = "the file is damaged; re-export it"
_MISMATCH = "the config.json does not match the weight files"


def layer_metadata(layer: CompressedModule) -> dict[str, Any]:
    return {"shared": sorted(layer.shared_tensors()), "codec": layer.codec, "version": layer.stored_version(),
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


def _is_layer_meta(meta: Any) -> bool:
    """A layer's metadata is an object whose `shared` (read before any layer is decoded) lists names."""
    shared = meta.get("shared", []) if isinstance(meta, dict) else None
    return isinstance(shared, list) and all(isinstance(k, str) for k in shared)


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
        except (ValueError, RecursionError) as err:  # JSONDecodeError, and integers too long to parse
            raise CheckpointError(f"{file}: its metadata is not valid JSON ({err})", _REEXPORT) from None
        if not isinstance(file_layers, dict) or not all(_is_layer_meta(m) for m in file_layers.values()):
            raise CheckpointError(f"{file}: its metadata is damaged (layers is not an object of objects)", _REEXPORT)
        if not isinstance(file_tied, dict) or not all(isinstance(v, str) for v in file_tied.values()):
            raise CheckpointError(f"{file}: its metadata is damaged (tied is not an object of names)", _REEXPORT)
        layers.update(file_layers)
        tied.update(file_tied)
    return layers, tied


def _listed(label: str, items: list[str]) -> str:
    return f"{label} {items[:5]}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


_BAD_VALUE = (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError)
"""What a codec raises on params or tensors it cannot use: at the file boundary each is a CheckpointError."""


def _dense_values(dense: nn.Module) -> dict[str, Any]:
    """The sizes a codec's params must repeat: the dense layer's constructor values (in_features,
    kernel_size, ...) and its tensors' shapes as `<name>_shape` (weight_shape, bias_shape)."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(dense).items()
              if not k.startswith("_") and (type(v) in (int, str) or isinstance(v, tuple))}
    values.update({f"{k}_shape": list(p.shape) for k, p in dense.named_parameters(recurse=False)})
    return values


def layer_codec(name: str, meta: Any, dense: nn.Module, where: str) -> tuple[type[CompressedModule], dict[str, Any],
                                                                          set[str], set[str]]:
    """A layer's codec, params, own tensor names and shared tensor keys, from its metadata, before
    anything is read. Every size the params share with `dense` (the architecture's layer) must equal
    it: sizes come from the architecture, so a damaged or hostile file cannot make decoding allocate
    more than the model it claims to be."""
    damaged = CheckpointError(f"{where}: the metadata of layer {name!r} is damaged", _DAMAGED)
    if not name or not isinstance(meta, dict) or not isinstance(meta.get("params"), dict) \
            or not isinstance(meta.get("codec"), str):
        raise damaged
    cls, version, params = codec_for(meta["codec"]), meta.get("version", 1), meta["params"]
    if type(version) is not int:
        raise damaged
    if version > cls.codec_version:
        raise CheckpointError(f"{where}: layer {name} uses {meta['codec']} v{version}, "
                              f"this compresscli reads up to v{cls.codec_version}", "upgrade compresscli")
    dense_values = _dense_values(dense)
    for key, value in params.items():
        if key in dense_values and value != dense_values[key]:
            raise CheckpointError(f"{where}: layer {name} ({meta['codec']}) has {key}={value!r} in its metadata, "
                                  f"the architecture says {dense_values[key]!r}", _MISMATCH)
    try:
        own, shared = set(cls.expected_tensors(params)), set(cls.expected_shared(params))
    except _BAD_VALUE:
        raise damaged from None
    if not all(isinstance(k, str) for k in own | shared):
        raise damaged
    return cls, params, own, shared


def check_layer_tensors(name: str, codec: str, own: set[str], wanted: set[str], stored: set[str], shared: set[str],
                        where: str) -> None:
    """A layer's codec needs tensors `own` of its own and shared tensors `wanted`: the file holds `stored` of
    the first and `shared` of the second. Anything missing is named, before anything is read."""
    missing = sorted(own - stored)
    if missing:
        raise CheckpointError(f"{where}: layer {name} ({codec}) is missing tensors {[f'{name}.{m}' for m in missing]}",
                              _REEXPORT)
    absent = sorted(wanted - shared)
    if absent:
        raise CheckpointError(f"{where}: layer {name} needs shared tensors {[SHARED_PREFIX + k for k in absent]}",
                              _REEXPORT)


def shared_parameter(key: str, tensor: torch.Tensor, where: str, trainable: bool = True) -> nn.Parameter:
    """A shared tensor (FiPS base, RPS memory) as the Parameter layers share (trainable or not): floating
    point, or 8-bit integer codes of quantized values (never trainable; the codec checks them). A Parameter,
    not a buffer, also in the inference form: `Module.to` keeps one Parameter shared where it would copy a
    buffer once per layer holding it."""
    if not tensor.is_floating_point() and tensor.dtype not in (torch.int8, torch.uint8):
        raise CheckpointError(f"{where}: shared tensor {SHARED_PREFIX}{key} is {tensor.dtype}, neither floating "
                              "point nor quantized codes", _DAMAGED)
    return nn.Parameter(tensor, requires_grad=trainable and tensor.is_floating_point())


def decode_layer(cls: type[CompressedModule], name: str, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                 shared: dict[str, nn.Parameter], dense: nn.Module, where: str) -> CompressedModule:
    """One compressed layer from its own tensors (names relative to it), after `layer_codec` checked
    its params: a tensor that is also one of `dense`'s (a bias) must have its shape, and whatever
    the codec rejects is a CheckpointError naming the layer, never a traceback."""
    shapes = _dense_values(dense)
    for rel, tensor in tensors.items():
        if f"{rel}_shape" in shapes and list(tensor.shape) != shapes[f"{rel}_shape"]:
            raise CheckpointError(f"{where}: tensor {name}.{rel} is {list(tensor.shape)}, the architecture says "
                                  f"{shapes[f'{rel}_shape']}", _MISMATCH)
    try:
        layer = cls.from_tensors(tensors, params, shared)
    except CheckpointError as err:  # the codec's own check: say which layer it is about
        raise CheckpointError(f"{where}: layer {name}: {err.problem}", err.fix) from None
    except _BAD_VALUE as err:
        detail = f"its params have no {err.args[0]!r}" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{where}: layer {name} ({cls.codec}) cannot be decoded: {detail}",
                              _DAMAGED) from None
    weight = layer.dense_equivalent().get("weight")
    if weight is not None and "weight_shape" in shapes and list(weight) != shapes["weight_shape"]:
        raise CheckpointError(f"{where}: layer {name} ({cls.codec}) decodes to a {list(weight)} weight, "
                              f"the architecture says {shapes['weight_shape']}", _MISMATCH)
    return layer


def tensors_to_model(model: nn.Module, index: TensorIndex, where: str, dtype: torch.dtype | None = None,
                     include: Callable[[str], bool] | None = None,
                     shared_cache: dict[str, nn.Parameter] | None = None, trainable: bool = False) -> None:
    """Rebuild the compressed layers inside `model` (a skeleton from config) and assign every other
    tensor, reading one layer at a time. With `include`, only the layers and tensors whose names it
    accepts (a block being streamed); `shared_cache` then keeps tensors several blocks share. Compressed
    layers come in their inference form (compact, nothing trainable), or with `trainable` their training
    form (what recovery and further compression need).

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
            dense = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: compressed layer {name} does not exist in the architecture",
                                  _MISMATCH) from None
        cls, params, own_names, wanted = layer_codec(name, meta, dense, where)
        expected = {f"{name}.{rel}" for rel in own_names}
        check_layer_tensors(name, meta["codec"], own_names, wanted, {n[len(name) + 1:] for n in names & expected},
                            set(shared) | {k for k in wanted if SHARED_PREFIX + k in index}, where)
        for key in wanted - set(shared):
            shared[key] = shared_parameter(key, index.read([SHARED_PREFIX + key])[SHARED_PREFIX + key], where,
                                           trainable)
        own = {k[len(name) + 1:]: v for k, v in index.read(sorted(expected)).items()}
        names -= expected
        form = cls if trainable else codec_for(meta["codec"], trainable=False)
        layer = decode_layer(form, name, own, params, {k: shared[k] for k in wanted}, dense, where)
        if not trainable:
            layer.requires_grad_(False)
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
