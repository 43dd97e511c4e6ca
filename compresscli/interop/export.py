"""Exporting a compresscli output for the ecosystem: a plain Hugging Face or timm directory that
transformers' `from_pretrained` or timm's `create_model` loads with no compresscli installed.

`dense` writes every compressed layer as the dense tensors it computes with (zeros where weights were
removed), in the source architecture's layout: GPT-2's Conv1D weights transposed back, tied weights
stored once as the original stores them. Layers are decoded one at a time and streamed through a
ShardWriter, so the export holds one layer's dense weights (plus the tensors layers share and the
kept half of a tie), never a second copy of the model.

`compressed-tensors` writes the same directory with the compressed layers in compressed-tensors' formats
and the `quantization_config` block that names them in config.json: quantized dense Linears
(`quantized_linear`) as `pack-quantized` (ct_quantized: what transformers 5 loads), or sparse layers
(magnitude-style `sparse_linear`, and `condensed_linear` where it is 2:4) in its legacy sparse formats
(compressed_tensors). A first pass refuses what has no such format (reading only the layer metadata for
quantized models; decoding each sparse layer once to choose between `sparse-24-bitmask` (every layer 2:4)
and `sparse-bitmask`); the second writes, as `dense` does.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compresscli.interop import compressed_tensors, ct_quantized
from compresscli.core.errors import CheckpointError, CompressError
from compresscli.io.native import SHARED_PREFIX, read_format, tensors_to_model
from compresscli.codecs.base import replace_module
from compresscli.codecs import CompressedModule
from compresscli.core.progress import Progress, SilentProgress
from compresscli.core.registry import did_you_mean
from compresscli.io.safetensors import INDEX_NAME, ShardWriter, TensorIndex, atomic_directory
from compresscli.io.source import Source, build_skeleton, conv1d_to_linear, open_source, tied_groups

log = logging.getLogger(__name__)
FORMATS = ("dense", "compressed-tensors")
HF_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it
_MISMATCH = "the config.json does not match the weight files"


@dataclass
class ExportResult:
    """What `export` wrote, for the CLI's summary and --json."""

    to: Path
    format: str
    kind: str  # "hf" or "timm"
    model_class: str | None
    files: list[str]  # weight files, in DIR
    tensors: int
    bytes: int  # weight bytes written
    decoded_layers: int  # compressed layers written dense
    copied: list[str] = field(default_factory=list)  # other files copied from OUT
    untied: list[str] = field(default_factory=list)  # tied in the architecture, no longer equal: stored apart
    sparse_format: str | None = None  # compressed-tensors: the sparsity format the compressed layers are in
    quant_format: str | None = None  # compressed-tensors: the format the quantized layers are in
    notes: list[str] = field(default_factory=list)  # what the user must know to load it

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "to": str(self.to)}


def export(out: str | Path, to: str | Path, fmt: str = "dense", force: bool = False,
           shard_bytes: int = 2 * 1024**3, progress: Progress | None = None) -> ExportResult:
    """Write the compresscli output `out` as a plain `fmt` directory at `to` (atomically; an existing
    non-empty `to` only with `force`). Hugging Face outputs are sharded above `shard_bytes`; timm
    outputs are one model.safetensors, the only layout timm reads."""
    if fmt not in FORMATS:
        raise CompressError(f"unknown export format {fmt!r}", did_you_mean(fmt, FORMATS))
    source = open_source(out)
    if source.kind != "compressed":
        raise CheckpointError(f"{out} is not a compresscli output (its config.json has no compression block)",
                              "pass a directory written by `compress run`; this one loads as it is")
    to = Path(to)
    replace = _check_target(source.directory, to, force)
    kind = source.model_kind
    progress = progress or SilentProgress()
    block = _plan_compressed_tensors(source, progress) if fmt == "compressed-tensors" else None
    with atomic_directory(to, force=replace) as tmp:
        writer = ShardWriter(tmp, shard_bytes if kind == "hf" else sys.maxsize, HF_METADATA)
        decoded, untied = _write_dense(source, writer, progress, block.encode if block else None)
        files = writer.close()
        config = _plain_config(source, untied)
        if block:
            config["quantization_config"] = block.quantization_config()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copied = _copy_side_files(source.directory, tmp)
    sparse = isinstance(block, compressed_tensors.SparsityBlock)
    return ExportResult(to, fmt, kind, source.model_class, [f.name for f in files], len(writer.names),
                        writer.total_bytes, decoded, copied, untied, block.format if sparse else None,
                        ct_quantized.PACKED if block and not sparse else None, _loading_notes(sparse))


def _loading_notes(sparse: bool) -> list[str]:
    """A compressed-tensors sparse export that the installed transformers would load wrong, said out loud:
    transformers 5 keeps no sparsity_config and leaves those layers randomly initialised (only its load
    report lists them), and compressed-tensors >= 0.15 has no sparse decompressor any more."""
    import transformers

    if not sparse or int(transformers.__version__.split(".")[0]) < 5:
        return []
    return [f"transformers {transformers.__version__} cannot load sparse compressed-tensors checkpoints (it leaves "
            "the sparse layers randomly initialised): decompress with compressed-tensors <= 0.14 "
            "(ModelCompressor.decompress, transformers 4), or export --format dense for transformers 5"]


def _check_target(out: Path, to: Path, force: bool) -> bool:
    """Whether `to` may be replaced: refuse OUT itself, a directory inside it or holding it, and an
    existing non-empty `to` without `force`. An empty directory is simply filled."""
    a, b = out.resolve(), to.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise CompressError(f"--to {to} overlaps the checkpoint {out}", "write the export to a directory of its own")
    if to.exists() and not force and not (to.is_dir() and not any(to.iterdir())):
        raise CompressError(f"{to} already exists and is not empty",
                            "choose another --to, or pass --force to replace it")
    return to.exists()


def _plan_compressed_tensors(source: Source, progress: Progress) -> compressed_tensors.SparsityBlock | \
        ct_quantized.QuantizationBlock:
    """Refuse a checkpoint compressed-tensors cannot hold (a timm model, a layer with no format there, sparse
    and quantized layers in one model) and plan its one block: pack-quantized when any layer is quantized."""
    if source.model_kind != "hf":
        raise CompressError("compressed-tensors is a Hugging Face transformers format, this is a timm model",
                            "use --format dense, which timm loads")
    layers, _ = read_format(source.index, source.name)
    model, transposed = _skeleton(source)
    quantized = {unit: meta for unit, meta in layers.items()
                 if any(meta["params"].get(k) for k in CompressedModule.QUANT_PARAMS)}
    for unit, meta in quantized.items():
        ct_quantized.refuse_layer(unit, meta["codec"], meta["params"], type(model.get_submodule(unit)).__name__)
    if not quantized:
        return _plan_sparsity(source, layers, model, transposed, progress)
    sparse = next((unit for unit in layers if unit not in quantized), None)
    if sparse:
        raise CompressError(f"compressed-tensors holds quantized or sparse layers, not both in one model ({sparse}: "
                            f"{layers[sparse]['codec']}, {next(iter(quantized))}: quantized)", ct_quantized.FIX)
    plain = [name for name, module in model.named_modules()
             if name not in quantized and type(module).__name__ in ("Linear", "Conv1D")]
    return ct_quantized.QuantizationBlock({unit: meta["params"] for unit, meta in quantized.items()}, plain,
                                          source.index.read, getattr(model, "base_model_prefix", ""))


def _plan_sparsity(source: Source, layers: dict[str, Any], model: nn.Module, transposed: set[str],
                   progress: Progress) -> compressed_tensors.SparsityBlock:
    """Refuse a layer with no sparse format and choose the model's one sparsity format, decoding each
    compressed layer once."""
    for unit, meta in layers.items():
        compressed_tensors.refuse_codec(unit, meta["codec"])
    conv1d_to_linear(model)
    shared: dict[str, nn.Parameter] = {}
    all_24 = bool(layers)
    with torch.no_grad(), progress.task("checking sparsity", total=len(layers)) as task:
        for unit, meta in layers.items():
            weight = _read_unit(model, unit, layers, source.index, source.name, shared)[f"{unit}.weight"]
            weight = weight.t() if unit in transposed else weight  # (rows, cols) as the file will store it
            if meta["codec"] == "condensed_linear":
                compressed_tensors.refuse_condensed(unit, weight, meta["params"]["k"])
            all_24 = all_24 and compressed_tensors.fits_24(weight)
            task.advance()
    return compressed_tensors.SparsityBlock(compressed_tensors.BITMASK_24 if all_24 else compressed_tensors.BITMASK, sorted(layers))


def _skeleton(source: Source) -> tuple[nn.Module, set[str]]:
    """The architecture with parameters on meta, and the names of its Conv1D modules (whose weights the
    original stores transposed; `conv1d_to_linear` turns them into the layout the file is stored in)."""
    model = build_skeleton(source.model_kind, source.config, source.model_class)
    return model, {name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}


Encoder = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _write_dense(source: Source, writer: ShardWriter, progress: Progress,
                 encode: Encoder | None = None) -> tuple[int, list[str]]:
    """Decode and write the checkpoint one module at a time: a compressed layer as its dense tensors
    (or, given `encode`, as what it makes of them), any other module's own tensors as stored; returns
    the decoded layer count and the untied keys."""
    where, index = source.name, source.index
    layers, file_tied = read_format(index, where)
    model, transposed = _skeleton(source)
    order = list(model.state_dict())
    keeper_of: dict[str, str] = {}  # a tied tensor -> the one of its group the original stores (the first)
    for group in tied_groups(model):
        first, *others = sorted(group, key=order.index)
        keeper_of.update(dict.fromkeys(others, first))
    keepers = set(keeper_of.values())
    conv1d_to_linear(model)  # the layout the file is stored in
    units: dict[str, list[str]] = {}
    for key in model.state_dict():
        units.setdefault(key.rpartition(".")[0], []).append(key)
    _check_covered(index, layers, units, where)
    shared: dict[str, nn.Parameter] = {}
    kept: dict[str, torch.Tensor] = {}  # the written half of each tie, to compare its partners with
    untied: list[str] = []
    with torch.no_grad(), progress.task("exporting", total=len(units)) as task:
        for unit, keys in units.items():
            tensors = _read_unit(model, unit, layers, index, where, shared)
            if set(tensors) != set(keys):
                raise CheckpointError(f"{where}: {unit or 'the model'} decodes to {sorted(tensors)}, the "
                                      f"architecture holds {sorted(keys)}", _MISMATCH)
            written = {}
            for key in keys:
                tensor = tensors[key]
                if key in keeper_of:
                    if key in file_tied or torch.equal(tensor, kept[keeper_of[key]]):
                        continue  # tied: stored once, as the original stores it
                    untied.append(key)
                elif key in file_tied:  # stored once by compresscli, two tensors in the architecture
                    tensor = index.read([file_tied[key]])[file_tied[key]]
                if key in keepers:
                    kept[key] = tensor
                written[key] = tensor.t() if key.rpartition(".")[0] in transposed and key.endswith(".weight") \
                    else tensor
            if encode is not None and unit in layers:
                written = encode(unit, written)
            writer.add(written)
            task.advance()
    if untied:
        log.warning("tied tensors no longer equal after compression, stored apart: %s", ", ".join(untied))
    return sum(unit in layers for unit in units), untied


def _check_covered(index: TensorIndex, layers: dict[str, Any], units: dict[str, list[str]], where: str) -> None:
    """Every compressed layer is a module of the architecture and every stored tensor belongs to one
    (read unit by unit, a stray tensor would otherwise go unnoticed where a whole-model load refuses it)."""
    absent = sorted(name for name in layers if name not in units)
    if absent:
        raise CheckpointError(f"{where}: compressed layer {absent[0]} does not exist in the architecture", _MISMATCH)
    wanted_shared = {k for meta in layers.values() for k in meta.get("shared", [])}
    stray = []
    for name in index.names():
        if name.startswith(SHARED_PREFIX):
            if name[len(SHARED_PREFIX):] not in wanted_shared:
                stray.append(name)
            continue
        parts = name.split(".")
        if not any(".".join(parts[:i]) in layers for i in range(1, len(parts))) \
                and name not in units.get(name.rpartition(".")[0], []):
            stray.append(name)
    if stray:
        raise CheckpointError(f"{where}: unexpected tensors {sorted(stray)[:5]}", _MISMATCH)


def _scope(unit: str, layers: dict[str, Any]) -> Callable[[str], bool]:
    """Names `tensors_to_model` reads for one unit: a compressed layer's own tensors, or the tensors
    a plain module holds itself (not its children's)."""
    if unit in layers:
        return lambda name: name == unit or name.startswith(unit + ".")
    return lambda name: name not in layers and name.rpartition(".")[0] == unit


def _read_unit(model: nn.Module, unit: str, layers: dict[str, Any], index: TensorIndex, where: str,
               shared: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """One unit's dense tensors by state-dict key, decoded from the file; the skeleton is left as it
    was (parameters on meta), so nothing read stays in memory after the unit is written."""
    skeleton = model.get_submodule(unit) if unit else model
    params, buffers = dict(skeleton._parameters), dict(skeleton._buffers)
    tensors_to_model(model, index, where, include=_scope(unit, layers), shared_cache=shared)
    loaded = model.get_submodule(unit) if unit else model
    prefix = f"{unit}." if unit else ""
    if isinstance(loaded, CompressedModule):
        replace_module(model, unit, skeleton)
        return {prefix + k: v for k, v in loaded.dense_tensors().items()}
    own = {prefix + k: v for k, v in loaded.state_dict().items() if "." not in k}
    skeleton._parameters.update(params)
    skeleton._buffers.update(buffers)
    return own


def _plain_config(source: Source, untied: list[str]) -> dict[str, Any]:
    """The source's config.json as its library expects it: without compresscli's compression block
    (open_source already took it out); a Hugging Face config naming the class the weights fit and
    the dtype they are stored in; a timm pretrained_cfg that loads as it is."""
    config = dict(source.config)
    if source.model_kind == "hf":
        if source.model_class:
            config["architectures"] = [source.model_class]
        dtype = str(source.stored_dtype()).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype
        if untied:
            config["tie_word_embeddings"] = False
    elif "num_classes" in config:  # timm keeps a head only when its pretrained_cfg agrees on the class count
        config["pretrained_cfg"] = {**config.get("pretrained_cfg", {}), "num_classes": config["num_classes"]}
    return config


def _copy_side_files(out: Path, tmp: Path) -> list[str]:
    """Tokenizer files and whatever else OUT holds beside its weights and config.json."""
    skip = {"config.json", INDEX_NAME}
    copied = []
    for path in sorted(out.iterdir()):
        if path.name in skip or path.suffix == ".safetensors" or path.name.startswith("."):
            continue
        if path.is_dir():
            shutil.copytree(path, tmp / path.name)
        else:
            shutil.copy2(path, tmp / path.name)
        copied.append(path.name)
    return copied
