"""One stage of a recipe on the modules it targets, the same in both execution modes: its sizes before and
after, its statistics, its time; a configuration problem named with the recipe, the stage and where it ran;
under torchrun its results made identical on every rank."""
from __future__ import annotations

import time
from typing import Any

from torch import nn

from compresscli.codecs import CompressedModule
from compresscli.core.errors import RecipeError, StageError
from compresscli.engine.options import StageRecord
from compresscli.engine.recipe import Stage
from compresscli.methods import StageContext, compress_
from compresscli.training import distributed

STAGE_FIX = "change the stage's targets or params"


def run_stage(model: nn.Module, stage: Stage, names: list[str], ctx: StageContext, record: StageRecord,
              where: str) -> dict[str, Any]:
    """Apply `stage` to the modules `names` of `model` (none: the whole model), adding to `record`; returns
    the stage's statistics. `where` names the stage (and the unit) in messages."""
    wanted = set(names)
    record.params_before += stored_params(model, names)
    record.bytes_before += layer_bytes(model, names)
    started = time.time()
    try:
        stats = compress_(model, stage.config, (lambda m, n: n in wanted) if names else None, ctx)
    except StageError as err:
        raise RecipeError(f"{where}: {err.problem}", err.fix or STAGE_FIX) from None
    if stage.config.compresses and distributed.world().distributed:
        stats["ranks_differed"] = distributed.sync_modules(
            {n: model.get_submodule(n) for n in names} or {"": model}, where)
    record.seconds += time.time() - started
    record.params_after += stored_params(model, names)
    record.bytes_after += layer_bytes(model, names)
    return stats


def stored_params(model: nn.Module, names: list[str]) -> int:
    total = 0
    for name in names:
        module = model.get_submodule(name)
        stored = getattr(module, "stored_parameters", None)
        total += stored() if stored else sum(p.numel() for p in module.parameters())
    return total


def layer_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes the named layers take on disk: encoded tensors for compressed layers, plus each tensor they
    share (a FiPS base, an RPS memory) once; plain tensors for the others."""
    total, shared = 0, {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, CompressedModule):
            total += sum(t.numel() * t.element_size() for t in module.to_tensors().values())
            shared.update(module.shared_tensors())
        else:
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total + sum(t.numel() * t.element_size() for t in shared.values())
