"""The whole-model runner: the model is loaded once and compressed in place, a frozen copy of the original
kept only when a stage compares against it (distillation, block targets); the output is streamed to disk
layer by layer, the model then gives way to its reloaded copy for the reload check and the evaluation.

Under torchrun every rank runs the same stages on the same data (engine.stage: one-shot results broadcast
from rank 0, recovery data-parallel or sharded); only rank 0 writes, verifies and evaluates, once every
rank has finished; the others wait for its verdict, so a failure anywhere fails every rank.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from torch import nn

from compresscli.codecs.base import compressed_layers
from compresscli.core.errors import CompressError
from compresscli.core.progress import Progress, SilentProgress
from compresscli.core.resources import PeakMemory
from compresscli.engine.options import RunOptions, StageRecord, check_out
from compresscli.engine.planning import needs_data, resolve_targets
from compresscli.engine.prediction import MemoryPrediction
from compresscli.engine.recipe import Recipe
from compresscli.engine.report import RunResult, build_report, execution, write_report, write_side_files
from compresscli.engine.stage import run_stage
from compresscli.engine.verify import ReloadCheck
from compresscli.io.checkpoint import Checkpoint, load_compressed, load_source
from compresscli.io.data import prepare_data
from compresscli.io.native import FORMAT_METADATA, write_model
from compresscli.io.safetensors import ShardWriter, atomic_directory
from compresscli.io.source import open_source
from compresscli.methods import StageContext
from compresscli.model.architecture import detect
from compresscli.model.inputs import synthetic_batch
from compresscli.model.metrics import compare
from compresscli.model.tasks import Batch, Task, compute_dtype
from compresscli.training import distributed

log = logging.getLogger(__name__)


def run_recipe(ckpt: Checkpoint, recipe: Recipe, out: Path | None, options: RunOptions,
               progress: Progress | None = None, force: bool = False,
               prediction: MemoryPrediction | None = None, peak: PeakMemory | None = None,
               keep_model: bool = True) -> RunResult:
    """Compress `ckpt` (held whole) with `recipe`; write OUT atomically unless dry-run. `ckpt.model` is
    modified in place; with keep_model=False it is released once saved (ckpt.model and result.model
    become None), so verification and evaluation never hold it beside its reloaded copy. `peak`
    measures from where the caller started (default: from here)."""
    progress = progress or SilentProgress()
    device = distributed.pick_device(options.device)
    started, peak = time.time(), peak or PeakMemory(device)
    torch.manual_seed(options.seed)
    model, task = ckpt.model, ckpt.task()
    check_out(out, options, force, ckpt.source.directory if ckpt.source is not None else None)
    if options.dtype is not None and compute_dtype(model) != options.dtype:
        model.to(options.dtype)  # a checkpoint loaded in another dtype: compressed, written and checked in this one
    targets = resolve_targets(recipe, model)
    world = distributed.world()

    keep_original = not options.dry_run and any(s.config.needs_original() for s in recipe.stages)
    teacher = copy.deepcopy(model).eval().requires_grad_(False).to(device) if keep_original else None
    model.to(device)
    batcher = splits = data_name = None
    data = {}
    if needs_data(recipe, options):
        with progress.task("loading data"):
            batcher, splits, data_name = prepare_data(ckpt, task, options.data, options.max_length)
            data = {"train": batcher.batches(splits.train, options.batch_size),
                    "calibration": batcher.batches(splits.calibration, options.batch_size, options.calibration_examples)}
    ctx = StageContext(teacher=teacher, task=task, device=device, progress=progress, dry_run=options.dry_run,
                       seed=options.seed, shard=bool(options.shard), **data)

    records = []
    for i, (stage, names) in enumerate(zip(recipe.stages, targets)):
        record = StageRecord(i, stage.method, names)
        record.stats = run_stage(model, stage, names, ctx, record, f"{recipe.source}: stage {i} ({stage.method})")
        records.append(record)
        log.info("stage %d (%s): %d modules, %.1fs", i, stage.method, len(names), record.seconds)
    del ctx, teacher  # the frozen original is not needed past the stages

    result = RunResult(model, {}, records, prediction, rank=world.rank)
    if options.dry_run or out is None:
        return result
    if not world.is_main:  # rank 0 writes; this rank only learns whether it did
        if not keep_model:
            ckpt.model = result.model = model = None
        distributed.wait_for_writer()
        return result
    model = None  # result.model holds it: _save may release it
    with distributed.writer_outcome() as everyone_done:
        everyone_done()
        eval_batches = batcher.batches(splits.eval, options.batch_size, options.eval_examples) if batcher else []
        _save(ckpt, recipe, out, options, progress, force, result, eval_batches, data_name, device, task, started,
              peak, keep_model)
    return result


def _save(ckpt: Checkpoint, recipe: Recipe, out: Path, options: RunOptions, progress: Progress, force: bool,
          result: RunResult, eval_batches: list[Batch], data_name: str | None, device: torch.device, task: Task,
          started: float, peak: PeakMemory, keep_model: bool) -> None:
    """Write OUT atomically, check that it reloads to the same outputs, evaluate, and report."""
    model = result.model
    check_batch = eval_batches[0] if eval_batches else synthetic_batch(model, task, 2)
    family, layers = detect(model).family, sorted(compressed_layers(model))
    with progress.task("saving and verifying"), atomic_directory(Path(out), force=force) as tmp:
        writer = ShardWriter(tmp, options.shard_bytes, FORMAT_METADATA)
        write_model(model, writer)
        writer.close()
        write_side_files(tmp, ckpt, recipe, layers)
        with torch.no_grad():
            expected = task.outputs(model.eval(), _on(check_batch, device)).float().cpu()
        dtype, depth = compute_dtype(model), max(1, len(detect(model).blocks))
        if not keep_model:  # the file holds it now: the reloaded copy replaces it rather than joining it
            ckpt.model = result.model = model = None
        compressed = load_compressed(open_source(tmp), options.dtype).model.to(device)
        check = ReloadCheck(writer.checksums)
        check.visit(compressed)
        with torch.no_grad():
            got = task.outputs(compressed.eval(), _on(check_batch, device)).float().cpu()
        check.outputs(expected, got, dtype, depth)
        if keep_model:
            compressed = model
        evaluation = None
        if options.evaluate and eval_batches:
            with progress.task("evaluating original vs compressed"):
                original = _original_for_eval(ckpt, options).to(device)
                evaluation = {"data": data_name, **compare(original, compressed, task, eval_batches, device)}
                del original
        del compressed
        report = build_report(ckpt.source or ckpt, ckpt.name, ckpt.kind, family, recipe, result.stages, tmp,
                              set(layers), check, check_batch, evaluation, device, started,
                              lambda: execution(result.mode, peak, result.prediction, options))
        write_report(tmp, report)
    result.report = report


def _on(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _original_for_eval(ckpt: Checkpoint, options: RunOptions) -> nn.Module:
    """The original, read again from its files (the compressed model replaced it in memory)."""
    if ckpt.source is None:
        raise CompressError(f"{ckpt.name} has no files to read the original back from for evaluation",
                            "load it with compresscli.io.checkpoint.load_checkpoint, or pass evaluate=False")
    return load_source(ckpt.source, options.dtype).model.eval()
