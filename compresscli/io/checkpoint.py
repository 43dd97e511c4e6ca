"""Loading whole models: Hugging Face directories through transformers' own `from_pretrained`, timm
models built by timm with their weights assigned from the file (no random init, no second copy),
compressed output directories decoded layer by layer, and the bundled references (`ref:NAME`).
Never a hub download. What a checkpoint is, and which class fits it, is decided in source.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresscli.core.errors import CheckpointError
from compresscli.core.resources import is_out_of_memory
from compresscli.model.tasks import Task, task_for
from compresscli.io.source import (Source, assign_tensors, build_skeleton, check_fit, conv1d_to_linear, hf_class,
                                   hf_config_of, open_source, skeleton_of)

log = logging.getLogger(__name__)
DTYPE_NAMES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Checkpoint:
    """A loaded model and what is needed to rebuild, tokenize for, and describe it."""

    model: nn.Module
    kind: str  # "hf" or "timm": how the architecture is built
    config: dict[str, Any]  # the source config (HF config dict, or timm's {architecture, model_args, ...})
    name: str
    directory: Path | None = None  # where tokenizer files live, for HF models
    compression: dict[str, Any] | None = None  # the "compression" block when loaded from an OUT dir
    file_bytes: int = 0  # bytes of the weight file(s) on disk
    source: Source | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_class(self) -> str:
        return type(self.model).__name__ if self.kind == "hf" else self.config.get("architecture", "")

    def task(self) -> Task:
        """How this model is run and judged (sentence-embedding checkpoints pool as their config says)."""
        return task_for(self.kind, self.model, self.source.pooling if self.source else None)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """`--dtype` value -> dtype; None / "auto" keeps the checkpoint's own."""
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        from compresscli.core.registry import did_you_mean

        raise CheckpointError(f"unknown dtype {name!r}", did_you_mean(name, list(DTYPE_NAMES)))
    return DTYPE_NAMES[name]


def load_checkpoint(spec: str | Path, weights: str | Path | None = None, dtype: torch.dtype | None = None,
                    trainable: bool = False) -> Checkpoint:
    """Resolve a CLI/library source string to a ready model in eval mode, in the checkpoint's dtype
    unless `dtype` says otherwise; a compresscli output's layers in their inference form, or with
    `trainable` their training form."""
    return load_source(open_source(spec, weights), dtype, trainable)


def load_source(source: Source, dtype: torch.dtype | None = None, trainable: bool = False) -> Checkpoint:
    if source.kind == "hf":
        model = _from_pretrained(source, dtype)
    elif source.kind == "timm":
        model = skeleton_of(source)
        mapping = check_fit(model, source.index, source.name)
        assign_tensors(model, {k: t for k, t in zip(mapping, source.index.read(list(mapping.values()), dtype).values())})
    else:
        return load_compressed(source, dtype, trainable)
    kind = source.kind
    return Checkpoint(model.eval(), kind, source.config, source.name, directory=source.directory,
                      file_bytes=source.file_bytes, source=source)


def _from_pretrained(source: Source, dtype: torch.dtype | None) -> nn.Module:
    """transformers' own loading (meta-device init, shards, dtype kept), with the class source.py chose;
    anything it would have left randomly initialised or resized is an error naming the tensors."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # unused tensors are reported by source.py's notes
    transformers.utils.logging.disable_progress_bar()
    cls = hf_class(source.model_class, hf_config_of(source.config))
    try:
        model, info = cls.from_pretrained(str(source.directory), dtype=dtype or "auto", output_loading_info=True,
                                          local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        if is_out_of_memory(err):
            raise
        raise CheckpointError(f"transformers cannot load {source.directory} ({str(err).splitlines()[0]})",
                              "check the checkpoint's config.json and weight files") from None
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        listed = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, sorted(v)[:4]))}" for k, v in problems.items())
        raise CheckpointError(f"{source.directory}: weights do not fit {cls.__name__} ({listed})",
                              "the weights do not fit this architecture; check the checkpoint and its config")
    conv1d_to_linear(model)
    return model


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """An architecture with fresh (randomly initialised) weights, from a config alone."""
    if kind == "timm":
        import timm

        return timm.create_model(config["architecture"], pretrained=False, num_classes=config.get("num_classes", 1000),
                                 **config.get("model_args", {}))
    hf_config = hf_config_of(config)
    return hf_class((config.get("architectures") or [None])[0], hf_config)(hf_config)


def load_compressed(source: Source, dtype: torch.dtype | None = None, trainable: bool = False) -> Checkpoint:
    """A compresscli output: the source architecture's skeleton, each compressed layer decoded from its
    tensors (inference form, or with `trainable` training form) and every other tensor assigned, one
    tensor read at a time."""
    from compresscli.io.native import tensors_to_model

    from compresscli.core.resources import release_free_heap

    model = skeleton_of(source)
    tensors_to_model(model, source.index, source.name, dtype, trainable=trainable)
    release_free_heap()  # decoding frees many blocks under glibc's mmap threshold: give their pages back
    kind = source.model_kind
    return Checkpoint(model.eval(), kind, source.config, source.name, directory=source.directory,
                      compression=source.compression, file_bytes=source.file_bytes, source=source)


__all__ = ["Checkpoint", "build_model", "build_skeleton", "load_checkpoint", "load_compressed", "load_source",
           "parse_dtype"]


def recorded_original(ckpt: Checkpoint) -> Checkpoint:
    """The original a compresscli output records as its source (what `eval` and `bench` compare with
    when no --baseline is given)."""
    source = (ckpt.compression or {}).get("source")
    if source is None:
        raise CheckpointError(f"{ckpt.name} records no original to compare with", "pass --baseline ORIGINAL")
    return load_checkpoint(source)
