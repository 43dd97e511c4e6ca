"""Checkpoints on disk, opened without reading their weights.

A `Source` says what a checkpoint is (Hugging Face, timm, or a compresscli output), holds its config,
the model class its tensors fit, and a lazy index of those tensors. Everything after this reads
weights through it: the whole-model loader (io/checkpoint.py) hands Hugging Face directories to
transformers' own `from_pretrained`; the block-by-block runner (engine/block_by_block.py) builds a skeleton whose
parameters live on the meta device and reads one block at a time.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, always
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

from compresscli.core.errors import CheckpointError
from compresscli.core.registry import did_you_mean
from compresscli.io.safetensors import DTYPES, TensorIndex

_MISMATCH_FIX = "the weights do not fit this architecture; check the checkpoint and its config"
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


@dataclass
class Source:
    kind: str  # "hf", "timm" or "compressed"
    name: str  # as the user named it
    config: dict[str, Any]  # HF config dict, or timm's {architecture, num_classes, model_args, pretrained_cfg}
    index: TensorIndex
    directory: Path | None = None  # where config and tokenizer files live
    model_class: str | None = None  # HF: the transformers class the tensors fit
    notes: list[str] = field(default_factory=list)  # what the loader decided for the user (a head dropped, ...)
    pooling: str | None = None  # sentence-transformers pooling ("mean", "cls", "max") for embedding models
    compression: dict[str, Any] | None = None  # the "compression" block of a compresscli output

    @property
    def file_bytes(self) -> int:
        return self.index.file_bytes

    @property
    def model_kind(self) -> str:
        """"hf" or "timm": how the architecture is built (a compressed output records its source's)."""
        return self.compression.get("source_kind", "hf") if self.compression else self.kind

    def stored_dtype(self) -> torch.dtype:
        """The floating-point dtype holding most of the weight bytes (the checkpoint's dtype)."""
        by_dtype: dict[str, int] = {}
        for entry in self.index.entries.values():
            if DTYPES.get(entry.dtype, torch.int8).is_floating_point:
                by_dtype[entry.dtype] = by_dtype.get(entry.dtype, 0) + entry.nbytes
        return DTYPES[max(by_dtype, key=by_dtype.get)] if by_dtype else torch.float32


# ----------------------------------------------------------------------------- opening

def open_source(spec: str | Path, weights: str | Path | None = None) -> Source:
    """Resolve a CLI/library source string, reading configs and safetensors headers only."""
    spec = str(spec)
    if spec.startswith("ref:"):
        from compresscli.io.references import reference_path

        source = open_source(reference_path(spec[4:]))
        source.name = spec
        return source
    if spec.startswith("timm:"):
        if weights is None:
            raise CheckpointError(f"{spec} needs its weights", "pass --weights FILE.safetensors (nothing is downloaded)")
        return _open_timm_arch(spec[5:], Path(weights))
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"no such file or directory: {path}", "check the path")
    if path.is_file():
        if (path.parent / "config.json").is_file() and path.suffix == ".safetensors":
            return open_source(path.parent)
        raise CheckpointError(f"{path} is a bare weight file with no config.json beside it",
                              "pass its directory, or timm:ARCH --weights FILE")
    st_modules = _sentence_transformer_modules(path)
    encoder_dir = path / st_modules.get(ST_TRANSFORMER, "") if st_modules else path
    config = read_config(encoder_dir)
    if "compression" in config:
        compression = config.pop("compression")
        if not isinstance(compression, dict):
            raise CheckpointError(f"{path / 'config.json'}: the compression block is not an object",
                                  "re-export the checkpoint")
        model_class = compression.get("model_class") or (config.get("architectures") or [None])[0]
        return Source("compressed", spec, config, TensorIndex.of_directory(path), path, model_class=model_class,
                      compression=compression, pooling=compression.get("pooling"))
    if "architecture" in config:
        return Source("timm", spec, config, _timm_index(path), path, model_class=config["architecture"])
    if "model_type" in config:
        source = Source("hf", spec, config, TensorIndex.of_directory(encoder_dir), encoder_dir)
        source.model_class, source.notes = choose_hf_class(config, source.index, str(encoder_dir))
        if st_modules and ST_POOLING in st_modules:
            source.pooling = _pooling_mode(path / st_modules[ST_POOLING])
            where = f"in {encoder_dir.name}/" if encoder_dir != path else "at the top level"
            source.notes.append(f"sentence-transformers directory: the encoder {where}, {source.pooling} pooling")
        return source
    raise CheckpointError(f"{encoder_dir / 'config.json'} is neither a Hugging Face nor a timm config "
                          "(no model_type/architecture)", "point at a Hugging Face, timm or compresscli output directory")


def read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint directory (no config.json)",
                              "point at a Hugging Face, timm or compresscli output directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})", "repair or re-export the config") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object", "repair or re-export the config")
    return config


def _sentence_transformer_modules(path: Path) -> dict[str, str]:
    """sentence-transformers' modules.json: module type -> its sub-directory ("" for the root)."""
    modules_path = path / "modules.json"
    if not modules_path.is_file():
        return {}
    try:
        modules = json.loads(modules_path.read_text())
        return {str(m["type"]): str(m.get("path", "")) for m in modules}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{modules_path} is not a sentence-transformers module list ({err})",
                              "repair it, or remove it to load the directory as a plain encoder") from None


def _pooling_mode(directory: Path) -> str:
    config = read_config(directory)
    modes = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    if len(modes) != 1:
        raise CheckpointError(f"{directory / 'config.json'} asks for pooling {modes or 'none'}; compresscli evaluates "
                              "with one of mean, cls or max", "set exactly one pooling_mode_* to true")
    return modes[0]


def _timm_index(path: Path) -> TensorIndex:
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path} has a timm config.json but no model.safetensors", "add the weights file")
    return TensorIndex.of_files([path / "model.safetensors"])


def _open_timm_arch(arch: str, weights: Path) -> Source:
    import timm

    if not timm.is_model(arch):
        raise CheckpointError(f"unknown timm architecture {arch!r}", did_you_mean(arch, timm.list_models()))
    index = TensorIndex.of_files([weights])
    cfg = timm.models.get_pretrained_cfg(arch)
    pretrained_cfg = cfg.to_dict() if cfg is not None else {}
    head = pretrained_cfg.get("classifier", "head")
    head_entry = index.entries.get(f"{head}.weight")
    config = {"architecture": arch, "model_args": {}, "pretrained_cfg": pretrained_cfg}
    if head_entry is not None:
        config["num_classes"] = head_entry.shape[0]
    return Source("timm", arch, config, index, model_class=arch)


# ----------------------------------------------------------------------------- skeletons

@contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside create their parameters on the meta device: no memory and no random
    initialisation for weights that are about to be read from disk. Buffers stay real, so what a
    constructor computes (rotary frequencies, relative-position tables) is kept. (accelerate's
    init_empty_weights(include_buffers=False) does the same; compresscli does not depend on accelerate.)"""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def hf_class(name: str | None, hf_config: Any) -> type:
    """The transformers class named `name`, or the base model class for the config's type."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if name and hasattr(transformers, name):
        return getattr(transformers, name)
    try:
        return MODEL_MAPPING[type(hf_config)]
    except KeyError:
        raise CheckpointError(f"transformers has no model class for config type {type(hf_config).__name__}",
                              "check the config's model_type") from None


def hf_config_of(config: dict[str, Any]) -> Any:
    import transformers

    cfg = dict(config)
    try:
        return transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"transformers cannot read this config ({err})", "check config.json's model_type") from None


def build_skeleton(kind: str, config: dict[str, Any], model_class: str | None = None) -> nn.Module:
    """The architecture with its parameters on the meta device (see params_on_meta)."""
    with params_on_meta():
        if kind == "timm":
            import timm

            arch = config["architecture"]
            if not timm.is_model(arch):
                raise CheckpointError(f"unknown timm architecture {arch!r}", did_you_mean(arch, timm.list_models()))
            return timm.create_model(arch, pretrained=False, num_classes=config.get("num_classes", 1000),
                                     **config.get("model_args", {}))
        if kind == "hf":
            hf_config = hf_config_of(config)
            return hf_class(model_class, hf_config)(hf_config)
    raise CheckpointError(f"unknown model kind {kind!r}", "the compression block of config.json is damaged")


def skeleton_of(source: Source) -> nn.Module:
    """The source's architecture with parameters on meta, in the layout of its file: a plain checkpoint
    keeps transformers' Conv1D (converted block by block as it is read), a compressed one is stored
    in the Linear layout already."""
    model = build_skeleton(source.model_kind, source.config, source.model_class)
    if source.kind == "compressed":
        conv1d_to_linear(model)
    return model.eval()


def conv1d_to_linear(model: nn.Module, exclude: tuple[str, ...] = ()) -> None:
    """GPT-2 style checkpoints use transformers' Conv1D (weight in x out), so we swap in nn.Linear
    (weight out x in): every method and codec then sees one layout. Modules under `exclude` prefixes
    are left alone (blocks not read yet)."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D" or (name + ".").startswith(exclude):
            continue
        linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None,
                           dtype=module.weight.dtype, device=module.weight.device)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)


# ----------------------------------------------------------------------------- matching tensors to a class

def tied_groups(model: nn.Module) -> list[set[str]]:
    """Names that share one Parameter object (tied embeddings / LM heads); identity works on meta too."""
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def _model_keys_of_file(model: nn.Module, names: set[str]) -> dict[str, str]:
    """Each file tensor name -> the state-dict key transformers would load it into: the model's own
    checkpoint renamings (legacy names such as GPT-NeoX's embed_out) and the base-model prefix either
    way. Tensors transformers would transform rather than rename (fused or split on load) map nowhere:
    only the whole-model loader, which is transformers itself, reads those."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    expected = model.state_dict()
    renamings, converters = [], []
    try:  # transformers 5's loading machinery (public to PEFT); older versions rename nothing
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_converters, rename_source_key
        from transformers.modeling_utils import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            transforms = get_model_conversion_mapping(model)
            renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
            converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except ImportError:
        rename_source_key = None
    mapping: dict[str, str] = {}
    for name in names:
        if renamings and rename_source_key is not None:
            if converters and apply_converters(name, converters)[1] is not None:
                continue
            key, _ = rename_source_key(name, renamings, [], prefix or None, expected)
        else:
            key = name
        if key not in expected and prefix:
            key = next((k for k in (f"{prefix}.{key}", key[len(prefix) + 1:] if key.startswith(prefix + ".") else None)
                        if k and k in expected), key)
        mapping[name] = key
    return mapping


def file_key_map(model: nn.Module, names: set[str]) -> tuple[dict[str, str], list[str]]:
    """Each state-dict key of `model` -> the tensor name holding it in the file (see
    _model_keys_of_file); and the keys found nowhere (a tied alias whose partner is found does not
    count as missing)."""
    expected = model.state_dict()
    mapping = {key: name for name, key in _model_keys_of_file(model, names).items() if key in expected}
    satisfied = set(mapping)
    for group in tied_groups(model):
        if group & satisfied:
            satisfied |= group
    missing = [k for k in expected if k not in satisfied]
    return mapping, missing


def choose_hf_class(config: dict[str, Any], index: TensorIndex, where: str) -> tuple[str, list[str]]:
    """The class named by the config when the file holds its weights, else the bare base model (how
    sentence-embedding checkpoints are published: the encoder and pooler under a masked-LM config)."""
    hf_config = hf_config_of(config)
    named = (config.get("architectures") or [None])[0]
    base = hf_class(None, hf_config)
    candidates = [hf_class(named, hf_config)] if named else []
    if base not in candidates:
        candidates.append(base)
    names = set(index.names())
    failures = []
    for cls in candidates:
        with params_on_meta():
            skeleton = cls(hf_config)
        mapping, missing = file_key_map(skeleton, names)
        if not missing:
            notes = []
            if failures:
                notes.append(f"config.json names {failures[0][0]}, but the file holds none of its head "
                             f"({', '.join(failures[0][1][:3])}): loaded as {cls.__name__}")
            buffers = {n for n, _ in skeleton.named_buffers()}  # e.g. position_ids, recomputed, not loaded
            unused = sorted(n for n in names - set(mapping.values()) if n not in buffers)
            if unused:
                notes.append(f"tensors in the file that {cls.__name__} does not use: {', '.join(unused[:4])}"
                             + (f" (+{len(unused) - 4} more)" if len(unused) > 4 else ""))
            return cls.__name__, notes
        failures.append((cls.__name__, missing))
    name, missing = failures[-1]
    unexpected = sorted(names - set(file_key_map(skeleton, names)[0].values()))
    problems = [f"missing: {', '.join(missing[:4])}" + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")]
    if unexpected:
        problems.append(f"unexpected: {', '.join(unexpected[:4])}" + (f" (+{len(unexpected) - 4} more)"
                                                                      if len(unexpected) > 4 else ""))
    raise CheckpointError(f"{where}: weights do not fit the architecture {name} ({'; '.join(problems)})", _MISMATCH_FIX)


def check_fit(model: nn.Module, index: TensorIndex, where: str, strict: bool = True) -> dict[str, str]:
    """The key map of `model` onto the file, after checking every key and shape (and, when strict, that
    the file holds nothing the model does not read); a mismatch is one error naming the keys."""
    names = set(index.names())
    mapping, missing = file_key_map(model, names)
    expected = model.state_dict()
    wrong = [f"{k} {index.entries[f].shape} vs {tuple(expected[k].shape)}" for k, f in mapping.items()
             if tuple(index.entries[f].shape) != tuple(expected[k].shape)]
    unexpected = sorted(names - set(mapping.values())) if strict else []
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            problems.append(f"{label}: {', '.join(items[:4])}" + (f" (+{len(items) - 4} more)" if len(items) > 4 else ""))
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the architecture ({'; '.join(problems)})", _MISMATCH_FIX)
    return mapping


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put read tensors into `model` as its parameters and buffers (no copy), then re-tie tied weights."""
    ties = tied_groups(model)
    model.load_state_dict(tensors, strict=False, assign=True)
    for group in ties:  # assign replaced one alias of a tied pair; point the others at it
        owner = next((n for n in sorted(group) if n in tensors), None)
        if owner is None:
            continue
        param = model.get_parameter(owner)
        for name in group - {owner}:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name) if module_name else model, attr, param)
