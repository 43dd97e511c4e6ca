"""Planning a run before any weight is read: which modules each stage targets, which blocks are held together
(units), whether the recipe can run block by block, and how calibration batches are split. The memory this
needs and the mode that fits it are prediction.py's."""
from __future__ import annotations

from torch import nn

from compresscli.core.errors import RecipeError
from compresscli.engine.options import RunOptions
from compresscli.engine.recipe import Recipe, Stage
from compresscli.model.architecture import Architecture, Block, detect


# ----------------------------------------------------------------------------- targets and units

def resolve_stage_targets(stage: Stage, arch: Architecture, model: nn.Module, where: str) -> list[str]:
    if not stage.targets:
        return []
    names = arch.resolve(stage.targets, model, where)
    ignored = set(arch.resolve(stage.ignore, model, where + " ignore")) if stage.ignore else set()
    chosen = [n for n in names if n not in ignored and not any(n.startswith(i + ".") for i in ignored)]
    if not chosen:
        raise RecipeError(f"{where}: every target is ignored", "narrow the ignore list")
    return chosen


def resolve_targets(recipe: Recipe, model: nn.Module, arch: Architecture | None = None) -> list[list[str]]:
    """Every stage's module names, resolved before any work so a bad target fails in a second."""
    arch = arch or detect(model)
    return [resolve_stage_targets(s, arch, model, f"{recipe.source}: stage {i} ({s.method})")
            for i, s in enumerate(recipe.stages)]


def needs_data(recipe: Recipe, options: RunOptions) -> bool:
    return (options.evaluate and not options.dry_run) or any(s.config.needs_data() for s in recipe.stages)


def plan_units(recipe: Recipe, targets: list[list[str]], blocks: list[Block]) -> list[list[int]]:
    """Runs of consecutive blocks held together: the union of every stage's block_units (a FiPS group
    is one unit); blocks no stage groups are units of their own."""
    parent = list(range(len(blocks)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for stage, names in zip(recipe.stages, targets):
        touched = [b for b in blocks if any((n + ".").startswith(b.name + ".") for n in names)]
        for group in stage.config.block_units(touched) if touched else []:
            lo, hi = min(group), max(group)
            for i in range(lo, hi):  # a unit is contiguous: blocks are streamed in order
                parent[root(i + 1)] = root(lo)
    units: dict[int, list[int]] = {}
    for i in range(len(blocks)):
        units.setdefault(root(i), []).append(i)
    return sorted(units.values())


def sequential_problem(recipe: Recipe, targets: list[list[str]], blocks: list[Block]) -> RecipeError | None:
    """Why the recipe cannot run block by block on a model with these blocks (None: it can): no repeated
    blocks, blocks in stages of different widths, a stage that needs the whole model, or targets outside
    the blocks."""
    if not blocks:
        return RecipeError("no repeated blocks were found in this model", "drop --sequential")
    if len({b.stage for b in blocks}) > 1:
        return RecipeError("its blocks sit in stages of different widths, with layers between them",
                           "drop --sequential for this model")
    prefixes = tuple(b.name + "." for b in blocks)
    for i, (stage, names) in enumerate(zip(recipe.stages, targets)):
        where = f"{recipe.source}: stage {i} ({stage.method})"
        reason = stage.config.whole_model_only()
        if reason:
            params = stage.config.block_by_block_params
            fix = f"set params {params} for this stage, " if params else ""
            return RecipeError(f"{where} cannot run block by block: {reason}",
                               f"{fix}or drop --sequential / raise --max-memory where the model fits whole")
        outside = [n for n in names if not (n + ".").startswith(prefixes)]
        if outside:
            return RecipeError(f"{where} targets {', '.join(outside[:3])}, outside the repeated blocks; the sequential "
                               "mode compresses blocks only", f"add them to the stage's ignore list, e.g. ignore: "
                               f"[{outside[0]}], or drop --sequential")
    return None


def calibration_chunk(recipe: Recipe, batch_size: int) -> int:
    """Calibration batches are split to the smallest chunk any stage asks for (FiPS's batch_size)."""
    asked = [s.config.calibration_chunk() for s in recipe.stages if s.config.calibration_chunk()]
    return min([batch_size, *asked])
