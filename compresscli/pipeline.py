"""`compress run` as a library call: load data, apply the recipe's stages, save, verify, report."""
from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .architectures import Architecture, detect
from .checkpoint import Checkpoint, load_compressed
from .data import Batcher, Splits, batcher_for, load_examples, split
from .errors import CompressError, RecipeError
from .evaluate import compare, max_output_difference
from .export import compressed_layers, model_to_tensors
from .methods import StageContext, compress_
from .modules import CompressedModule
from .progress import Progress, SilentProgress
from .recipe import Recipe, Stage
from .report import inspect_path, render_markdown, subset_totals
from .safetensors_io import atomic_directory
from .tasks import Task, task_for

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "tokenizer.model", "merges.txt", "vocab.json")
RELOAD_TOLERANCE = 1e-4  # relative to the output scale; the rebuilt model runs the same ops, so this is slack


@dataclass
class RunOptions:
    data: str | None = None  # --data spec; text models default to the pydoc corpus
    batch_size: int = 16
    calibration_examples: int = 128
    eval_examples: int | None = None  # None: the whole eval split
    max_length: int = 128
    device: str = "auto"
    seed: int = 0
    dry_run: bool = False
    evaluate: bool = True


@dataclass
class RunResult:
    model: nn.Module
    report: dict[str, Any]
    plan: list[dict[str, Any]] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"--device {name} asked for, but no CUDA device is available", "use --device cpu or auto")
    return torch.device(name)


def resolve_stage_targets(stage: Stage, arch: Architecture, model: nn.Module, where: str) -> list[str]:
    if not stage.targets:
        return []
    names = arch.resolve(stage.targets, model, where)
    ignored = set(arch.resolve(stage.ignore, model, where + " ignore")) if stage.ignore else set()
    chosen = [n for n in names if n not in ignored and not any(n.startswith(i + ".") for i in ignored)]
    if not chosen:
        raise RecipeError(f"{where}: every target is ignored", "narrow the ignore list")
    return chosen


def needs_data(recipe: Recipe, options: RunOptions) -> bool:
    return (options.evaluate and not options.dry_run) or any(s.config.needs_data() for s in recipe.stages)


def prepare_data(ckpt: Checkpoint, task: Task, options: RunOptions) -> tuple[Batcher, Splits, str]:
    spec = options.data or ("pydoc" if task.modality == "text" else None)
    if spec is None:
        raise CompressError(f"{ckpt.name} reads images and no --data was given",
                            "pass --data digits, mnist1d or imagefolder:DIR")
    batcher = batcher_for(ckpt, task, options.max_length)
    return batcher, split(load_examples(spec)), spec


def run_recipe(ckpt: Checkpoint, recipe: Recipe, out: Path | None, options: RunOptions,
               progress: Progress | None = None, force: bool = False) -> RunResult:
    """Compress `ckpt` with `recipe`; write OUT atomically unless dry-run. `ckpt.model` is modified."""
    progress = progress or SilentProgress()
    started = time.time()
    device = pick_device(options.device)
    torch.manual_seed(options.seed)
    model = ckpt.model
    arch = detect(model)
    task = task_for(ckpt.kind, model)
    if out is not None and Path(out).exists() and not force and not options.dry_run:
        raise CompressError(f"output {out} already exists", "choose another --out, or pass --force to replace it")

    # Resolve every stage's targets before any work, so a bad target fails in a second.
    targets = [resolve_stage_targets(s, arch, model, f"{recipe.source}: stage {i} ({s.method})")
               for i, s in enumerate(recipe.stages)]

    teacher = copy.deepcopy(model).eval().requires_grad_(False).to(device)
    model.to(device)
    ctx = StageContext(teacher=teacher, task=task, device=device, progress=progress, dry_run=options.dry_run,
                       seed=options.seed)
    batcher = splits = data_name = None
    if needs_data(recipe, options):
        with progress.task("loading data"):
            batcher, splits, data_name = prepare_data(ckpt, task, options)
            ctx.calibration = batcher.batches(splits.calibration, options.batch_size, options.calibration_examples)
            ctx.train = batcher.batches(splits.train, options.batch_size)

    stage_reports, plan = [], []
    for i, (stage, names) in enumerate(zip(recipe.stages, targets)):
        before, bytes_before = _stored_params(model, names), layer_bytes(model, names)
        t0 = time.time()
        wanted = set(names)
        try:
            stats = compress_(model, stage.config, (lambda m, n: n in wanted) if names else None, ctx)
        except ValueError as err:
            raise RecipeError(f"{recipe.source}: stage {i} ({stage.method}): {err}", "change the stage's targets or params") from None
        after = _stored_params(model, names)
        stage_reports.append({"method": stage.method, "modules": names, "seconds": round(time.time() - t0, 2),
                              "stored_params_before": before, "stored_params_after": after, "stats": stats})
        plan.append({"stage": i, "method": stage.method, "modules": names, "params_before": before,
                     "params_after": after, "bytes_before": bytes_before,
                     "bytes_after": layer_bytes(model, names)})
        log.info("stage %d (%s): %d modules, %.1fs", i, stage.method, len(names), time.time() - t0)

    result = RunResult(model, {}, plan)
    if options.dry_run or out is None:
        return result

    targeted = sorted({n for n, _ in compressed_layers(model).items()})
    eval_batches = batcher.batches(splits.eval, options.batch_size, options.eval_examples) if batcher else []
    check_batch = eval_batches[0] if eval_batches else None
    with progress.task("saving and verifying"), atomic_directory(Path(out), force=force) as tmp:
        tensors, metadata = model_to_tensors(model)
        save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
        config = {**ckpt.config, "compression": {
            "tool": f"compresscli {__version__}", "source_kind": ckpt.kind, "source": ckpt.name,
            "recipe": recipe.to_dict(), "layers": targeted}}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        if ckpt.directory is not None:
            for name in TOKENIZER_FILES:
                if (ckpt.directory / name).is_file():
                    shutil.copy2(ckpt.directory / name, tmp / name)
        reloaded = load_compressed(tmp).model.to(device)
        diff = _reload_check(model, reloaded, task, check_batch, device)
        evaluation = None
        if options.evaluate and eval_batches:
            with progress.task("evaluating original vs compressed"):
                evaluation = {"data": data_name, **compare(teacher, reloaded, task, eval_batches, device)}
        memory = inspect_path(tmp / "model.safetensors")
        report = _report(ckpt, arch, recipe, stage_reports, memory, set(targeted), diff, check_batch, evaluation,
                         device, time.time() - started)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(render_markdown(report))
    result.report = report
    return result


def _reload_check(model, reloaded, task, batch, device) -> float:
    """The saved checkpoint must compute what the in-memory model computes."""
    if batch is None:
        return 0.0
    diff = max_output_difference(model, reloaded, task, batch, device)
    with torch.no_grad():
        scale = task.outputs(model.eval(), {k: v.to(device) for k, v in batch.items()}).abs().max().item()
    if diff > RELOAD_TOLERANCE * max(1.0, scale):
        raise CompressError(f"the saved checkpoint does not reproduce the model (max abs diff {diff:.3g})",
                            "this is a bug in a codec; please report it with --debug output")
    return diff


def _stored_params(model: nn.Module, names: list[str]) -> int:
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


def _report(ckpt, arch, recipe, stages, memory, targeted, diff, check_batch, evaluation, device, seconds) -> dict:
    rows = memory["layers"]
    target_totals = subset_totals(rows, targeted)
    value_bytes = {r["name"]: r["dense_bytes"] / max(1, r["dense_params"]) for r in rows}
    target_totals["theoretical_bytes"] = int(sum(r["stored_params"] * value_bytes[r["name"]] for r in rows
                                                 if r["name"] in targeted))
    model_totals = {**memory["totals"], "ratio": memory["totals"]["file_bytes"] / max(1, memory["totals"]["dense_bytes"])}
    examples = len(next(iter(check_batch.values()))) if check_batch else 0
    report = {
        "tool": f"compresscli {__version__}",
        "source": {"name": ckpt.name, "kind": ckpt.kind, "family": arch.family, "file_bytes": ckpt.file_bytes},
        "recipe": recipe.to_dict(), "device": str(device), "seconds": round(seconds, 1), "stages": stages,
        "memory": {"targeted": target_totals, "model": model_totals, "layers": rows},
        "reload": {"max_abs_diff": diff, "examples": examples},
        "eval": evaluation,
    }
    return report
