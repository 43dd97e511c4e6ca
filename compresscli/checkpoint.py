"""Loading checkpoints: Hugging Face directories, timm (`timm:ARCH --weights F` or timm's directory
layout), compressed output directories, and the bundled references (`ref:NAME`). Never a hub download."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, always
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

from .errors import CheckpointError
from .registry import did_you_mean
from .safetensors_io import read_tensors

_MISMATCH_FIX = "the weights do not fit this architecture; check the checkpoint and its config"


@dataclass
class Checkpoint:
    """A loaded model and what is needed to rebuild, tokenize for, and describe it."""

    model: nn.Module
    kind: str  # "hf" or "timm"
    config: dict[str, Any]  # the source config (HF config dict, or timm's {architecture, model_args, ...})
    name: str
    directory: Path | None = None  # where tokenizer files live, for HF models
    compression: dict[str, Any] | None = None  # the "compression" block when loaded from an OUT dir
    file_bytes: int = 0  # bytes of the weight file(s) on disk
    extra: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(source: str | Path, weights: str | Path | None = None) -> Checkpoint:
    """Resolve a CLI/library source string to a ready model in eval mode."""
    source = str(source)
    if source.startswith("ref:"):
        from .references import reference_path

        ckpt = load_checkpoint(reference_path(source[4:]))
        ckpt.name = source
        return ckpt
    if source.startswith("timm:"):
        if weights is None:
            raise CheckpointError(f"{source} needs its weights", "pass --weights FILE.safetensors (nothing is downloaded)")
        return _load_timm_arch(source[5:], Path(weights))
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"no such file or directory: {path}", "check the path")
    if path.is_file():
        if (path.parent / "config.json").is_file() and path.suffix == ".safetensors":
            return load_checkpoint(path.parent)
        raise CheckpointError(f"{path} is a bare weight file with no config.json beside it",
                              "pass its directory, or timm:ARCH --weights FILE")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)",
                              "point at a Hugging Face, timm or compresscli output directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})", "repair or re-export the config") from None
    if "compression" in config:
        return load_compressed(path)
    if "architecture" in config:
        return _load_timm_dir(path, config)
    if "model_type" in config:
        return _load_hf_dir(path, config)
    raise CheckpointError(f"{config_path} is neither a Hugging Face nor a timm config (no model_type/architecture)",
                          "point at a Hugging Face, timm or compresscli output directory")


# ----------------------------------------------------------------------------- building from config

def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """An architecture with fresh weights, from a config alone."""
    if kind == "timm":
        import timm

        return timm.create_model(config["architecture"], pretrained=False, num_classes=config.get("num_classes", 1000),
                                 **config.get("model_args", {}))
    if kind == "hf":
        import transformers

        cfg = dict(config)
        hf_config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        arch = (config.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        return cls(hf_config) if cls is not None else transformers.AutoModel.from_config(hf_config)
    raise CheckpointError(f"unknown model kind {kind!r}", "the compression block of config.json is damaged")


def conv1d_to_linear(model: nn.Module) -> None:
    """GPT-2 style checkpoints use transformers' Conv1D (weight in x out), so we swap in nn.Linear
    (weight out x in): every method and codec then sees one layout."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D":
            continue
        linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None,
                           dtype=module.weight.dtype, device=module.weight.device)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)


def load_weights_strict(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy weights after checking every key and shape; tied aliases and non-persistent buffers are
    the only tolerated differences."""
    expected = model.state_dict()
    non_persistent = {n for n, _ in model.named_buffers()} - set(expected)
    aliases: dict[str, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(param.data_ptr(), set()).add(name)
    missing = [k for k in expected if k not in tensors
               and not any(a in tensors for a in aliases.get(expected[k].data_ptr(), ()))]
    unexpected = [k for k in tensors if k not in expected and k not in non_persistent]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            problems.append(f"{label}: {', '.join(items[:4])}" + (f" (+{len(items) - 4} more)" if len(items) > 4 else ""))
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the architecture ({'; '.join(problems)})", _MISMATCH_FIX)
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


# ----------------------------------------------------------------------------- sources

def _load_hf_dir(path: Path, config: dict[str, Any]) -> Checkpoint:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights", "convert the checkpoint to safetensors first")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_tensors(file)[0])
    model = build_model("hf", config)
    load_weights_strict(model, _align_prefix(tensors, model), str(path))
    conv1d_to_linear(model)
    return Checkpoint(model.eval(), "hf", config, str(path), directory=path,
                      file_bytes=sum(f.stat().st_size for f in files))


def _align_prefix(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoints of a base model loaded into a *ForX class (or the reverse) differ by the prefix."""
    prefix = getattr(model, "base_model_prefix", "")
    keys = set(model.state_dict())
    if not prefix or any(k in keys for k in tensors):
        return tensors
    if all(k.startswith(prefix + ".") for k in tensors):
        return {k[len(prefix) + 1:]: v for k, v in tensors.items()}
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _timm_create(arch: str, **kwargs: Any) -> nn.Module:
    import timm

    _check_timm_arch(arch)
    return timm.create_model(arch, pretrained=False, **kwargs)


def _check_timm_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        raise CheckpointError(f"unknown timm architecture {arch!r}", did_you_mean(arch, timm.list_models()))


def _load_timm_arch(arch: str, weights: Path) -> Checkpoint:
    _check_timm_arch(arch)  # before reading a possibly large file
    tensors, _ = read_tensors(weights)
    model = _timm_create(arch)
    head = model.pretrained_cfg.get("classifier", "head")
    head_weight = tensors.get(f"{head}.weight")
    num_classes = head_weight.shape[0] if head_weight is not None else model.num_classes
    if num_classes != model.num_classes:
        model = _timm_create(arch, num_classes=num_classes)
    load_weights_strict(model, tensors, str(weights))
    config = {"architecture": arch, "num_classes": num_classes, "model_args": {},
              "pretrained_cfg": dict(model.pretrained_cfg)}
    return Checkpoint(model.eval(), "timm", config, arch, file_bytes=weights.stat().st_size)


def _load_timm_dir(path: Path, config: dict[str, Any]) -> Checkpoint:
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has a timm config.json but no model.safetensors", "add the weights file")
    tensors, _ = read_tensors(weights)
    model = _timm_create(config["architecture"], num_classes=config.get("num_classes", 1000),
                         **config.get("model_args", {}))
    load_weights_strict(model, tensors, str(weights))
    return Checkpoint(model.eval(), "timm", config, str(path), directory=path, file_bytes=weights.stat().st_size)


def load_compressed(path: Path) -> Checkpoint:
    from .export import tensors_to_model

    config = json.loads((path / "config.json").read_text())
    compression = config.pop("compression")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has no model.safetensors", "the output directory is incomplete; re-run compress")
    tensors, metadata = read_tensors(weights)
    kind = compression.get("source_kind")
    model = build_model(kind, config)
    conv1d_to_linear(model)  # compressed checkpoints are always stored in the Linear layout
    tensors_to_model(model, tensors, metadata, str(weights))
    return Checkpoint(model.eval(), kind, config, str(path), directory=path, compression=compression,
                      file_bytes=weights.stat().st_size)
