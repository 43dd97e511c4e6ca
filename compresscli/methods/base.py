"""The method contract: a validated dataclass config plus a handler registered for it.

`compress_(model, config, filter_fn)` is the one verb (torchao style): it picks the modules the
filter accepts and hands them to the handler registered for the config's method, in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..progress import Progress, SilentProgress
from ..registry import Registry


@dataclass
class MethodConfig:
    """Base of every method's config. Subclasses are dataclasses whose field defaults are the
    method's defaults; `__post_init__` raises ValueError naming the field and the fix."""

    method: ClassVar[str]
    default_targets: ClassVar[tuple[str, ...]] = ("mlp",)
    compresses: ClassVar[bool] = True  # False for stages that only train (finetune)

    def needs_data(self) -> bool:
        """Whether the stage reads ctx.calibration / ctx.train (the pipeline then loads --data)."""
        return True

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class StageContext:
    """What a handler may use besides the model: never a path, never a file (methods do no I/O)."""

    teacher: nn.Module | None = None  # the original model, frozen, for distillation/reconstruction
    task: Any = None  # compresscli.tasks.Task: how to run the model on a batch and compare outputs
    calibration: list[dict[str, torch.Tensor]] = field(default_factory=list)
    train: list[dict[str, torch.Tensor]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Progress = field(default_factory=SilentProgress)
    dry_run: bool = False  # compress, but skip every optimisation step
    seed: int = 0


Handler = Callable[[nn.Module, dict[str, nn.Module], Any, StageContext], dict[str, Any]]


@dataclass
class MethodSpec:
    config_cls: type[MethodConfig]
    handler: Handler
    summary: str


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(config_cls: type[MethodConfig], summary: str) -> Callable[[Handler], Handler]:
    def add(handler: Handler) -> Handler:
        METHODS.register(config_cls.method)(MethodSpec(config_cls, handler, summary))
        return handler

    return add


def compress_(model: nn.Module, config: MethodConfig,
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              context: StageContext | None = None) -> dict[str, Any]:
    """Apply `config` in place to the modules `filter_fn(module, name)` accepts; returns stage stats."""
    spec = METHODS.get(config.method)
    selected = {name: module for name, module in model.named_modules()
                if name and (filter_fn is None or filter_fn(module, name))}
    return spec.handler(model, selected, config, context or StageContext())


def leaf_layers(selected: dict[str, nn.Module], types: tuple[type, ...], what: str) -> dict[str, nn.Module]:
    """Selected layers of the given types; a selected container contributes its matching descendants.
    Finding none is an error naming `what` the method needed and what the targets hold instead."""
    found: dict[str, nn.Module] = {}
    for name, module in selected.items():
        if isinstance(module, types):
            found[name] = module
            continue
        for child_name, child in module.named_modules():
            if child_name and isinstance(child, types):
                found[f"{name}.{child_name}"] = child
    if not found:
        kinds = sorted({type(m).__name__ for m in selected.values()})
        raise ValueError(f"the targets select no {what} (they select {', '.join(kinds)})")
    return found
