"""The method contract: a validated dataclass config plus a handler registered for it.

`compress_(model, config, filter_fn)` is the one verb (torchao style): it picks the modules the
filter accepts and hands them to the handler registered for the config's method, in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from compresscli.model.architecture import Block
from compresscli.methods.calibration import Calibrator, WholeModelCalibrator
from compresscli.core.errors import StageError
from compresscli.methods.cost import Workload
from compresscli.core.progress import Progress, SilentProgress
from compresscli.core.registry import Registry


@dataclass(frozen=True)
class SizeKnob:
    """The parameter that sets a method's size, and the range `compress sweep` searches it in."""

    name: str
    low: float
    high: float
    log_scale: bool = False


@dataclass
class MethodConfig:
    """Base of every method's config. Subclasses are dataclasses whose field defaults are the
    method's defaults; `__post_init__` raises StageError naming the field and the fix."""

    method: ClassVar[str]
    default_targets: ClassVar[tuple[str, ...]] = ("mlp",)
    compresses: ClassVar[bool] = True  # False for stages that only train (finetune)
    size_knob: ClassVar[SizeKnob | None] = None  # what a sweep turns to reach a compression ratio
    sweep_variants: ClassVar[dict[str, dict[str, Any]]] = {}  # more sweep entries: name -> fixed params
    storage_like: ClassVar[str | None] = None  # a method whose bytes are the same at an equal knob value
    # Calibrates layer by layer inside each block: block by block it re-runs one block per layer group
    # instead of the model up to that layer, so the engine runs it block by block whenever it can.
    prefers_block_by_block: ClassVar[bool] = False
    # Params with which a stage whose defaults need the whole model runs one block at a time ({}: the defaults
    # already do; None: it never can). What `whole_model_only`'s message tells a user to write.
    block_by_block_params: ClassVar[dict[str, Any] | None] = {}

    def needs_data(self) -> bool:
        """Whether the stage reads calibration or training data (the engine then loads --data)."""
        return True

    def needs_original(self) -> bool:
        """Whether the stage compares against the original model (distillation, block targets): a
        whole-model run then keeps a frozen copy; the block-by-block engine computes the original
        block outputs from the weights it read."""
        return False

    def whole_model_only(self) -> str | None:
        """Why this stage cannot run one block at a time, and what to write instead (None: it can)."""
        return None

    def working_bytes(self, work: Workload) -> int:
        """Memory the stage needs beyond the model (or, block by block, the unit) while it runs, for
        the engine's memory prediction. Default: new compressed layers as large as the dense ones they replace
        (which stay alive until the stage ends)."""
        return work.weights * work.value_bytes

    def resident_bytes(self, work: Workload) -> int:
        """In-memory bytes the compressed targets hold beyond the dense weights they replaced (their
        training form: masks, maps; negative when smaller), for the memory prediction. Default: the same."""
        return 0

    def sweep_recovery(self, steps: int, lr: float) -> tuple[dict[str, Any], int]:
        """How a sweep's recovery budget of `steps` at `lr` splits: parameters for this stage, and the
        steps of a finetune stage after it. Default: all of it in the finetune stage."""
        return {}, steps

    def calibration_chunk(self) -> int | None:
        """Examples per calibration chunk the stage trains on (None: any); the block-by-block engine
        splits its calibration batches to the smallest chunk any stage asks for."""
        return None

    def block_units(self, blocks: list[Block]) -> list[list[int]]:
        """Indices of the blocks the stage must hold in memory together (default: each block alone)."""
        return [[block.index] for block in blocks]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_training(config: MethodConfig) -> None:
    """The checks every stage that trains shares (finetune, reconstruct, FiPS's reconstruction): `steps`,
    `lr`, `warmup`, and `batch_size` where the stage has one."""
    if config.steps < 0:
        raise StageError(f"steps must be >= 0, got {config.steps}")
    if not config.lr > 0:
        raise StageError(f"lr must be > 0, got {config.lr}")
    if not 0.0 <= config.warmup < 1.0:
        raise StageError(f"warmup must be in [0, 1) (a fraction of the steps), got {config.warmup}")
    if getattr(config, "batch_size", 1) < 1:
        raise StageError(f"batch_size must be >= 1, got {config.batch_size}")


@dataclass
class StageContext:
    """What a handler may use besides the model: never a path, never a file (methods do no I/O)."""

    teacher: nn.Module | None = None  # the original model, frozen, for distillation (whole-model runs only)
    task: Any = None  # compresscli.model.tasks.Task: how to run the model on a batch and compare outputs
    calibration: list[dict[str, torch.Tensor]] = field(default_factory=list)  # raw batches (whole-model runs)
    train: list[dict[str, torch.Tensor]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Progress = field(default_factory=SilentProgress)
    dry_run: bool = False  # compress, but skip every optimisation step
    seed: int = 0
    # How calibration data reaches the layers, in either execution mode (methods/calibration.py); built from
    # `calibration` and `teacher` when not given.
    calibrator: Calibrator | None = None
    shard: bool = False  # recovery training sharded across the ranks (FSDP2, training/sharding.py)

    def __post_init__(self) -> None:
        if self.calibrator is None and self.calibration:
            self.calibrator = WholeModelCalibrator(self.teacher, self.task, self.calibration, self.device)


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
        raise StageError(f"the targets select no {what} (they select {', '.join(kinds)})")
    return found
