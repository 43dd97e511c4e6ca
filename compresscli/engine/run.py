"""`compress run` as a library call: plan, predict memory, pick the execution mode, and run it.

Two runners take the same recipe: whole_model.py (the model loaded once) and block_by_block.py (the model
never whole). `compress_source` resolves the targets and predicts the peak memory of both from the
headers alone (planning.py), runs the whole-model path when it fits the budget, else the block-by-block
one, else refuses before reading any weight. Under torchrun the process group lives for the call.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from compresscli.core.precision import tf32_on
from compresscli.core.progress import Progress, SilentProgress
from compresscli.core.resources import PeakMemory, explain_out_of_memory
from compresscli.engine.block_by_block import run_recipe_sequential
from compresscli.engine.options import RunOptions, check_out
from compresscli.engine.planning import resolve_targets, sequential_problem
from compresscli.engine.prediction import choose_mode, gib, predict_memory, shard_wanted
from compresscli.engine.recipe import Recipe
from compresscli.engine.report import RunResult
from compresscli.engine.whole_model import run_recipe
from compresscli.io.checkpoint import load_source
from compresscli.io.safetensors import output_lock
from compresscli.io.source import Source, skeleton_of
from compresscli.model.architecture import detect
from compresscli.training import distributed

log = logging.getLogger(__name__)

OUT_OF_MEMORY_FIX = ("lower --batch-size, --calibration-examples or --max-length, run block by block (--sequential, "
                     "or a lower --max-memory), or free memory")


def compress_source(source: Source, recipe: Recipe, out: Path | None, options: RunOptions,
                    progress: Progress | None = None, force: bool = False) -> RunResult:
    """Plan, predict, pick the mode and run. Nothing is read beyond headers until the mode is chosen.
    OUT is locked from the start (a second run writing it fails at once); running out of memory ends
    in a ResourceError saying what to lower, with nothing written. Under torchrun the process group
    lives for the call, and only rank 0 locks and writes OUT."""
    check_out(out, options, force, source.directory)
    writes = out is not None and not options.dry_run
    device = distributed.pick_device(options.device)
    with distributed.process_group(device) as world:
        if not world.is_main:
            progress = SilentProgress()
        with output_lock(Path(out)) if writes and world.is_main else nullcontext(), \
                explain_out_of_memory("the run", OUT_OF_MEMORY_FIX), tf32_on(device):
            return _compress_source(source, recipe, out, options, progress or SilentProgress(), force)


def _compress_source(source: Source, recipe: Recipe, out: Path | None, options: RunOptions, progress: Progress,
                     force: bool) -> RunResult:
    peak = PeakMemory(distributed.pick_device(options.device))
    skeleton = skeleton_of(source)
    targets = resolve_targets(recipe, skeleton)
    if options.sequential:
        problem = sequential_problem(recipe, targets, detect(skeleton).blocks)
        if problem is not None:
            raise problem
    prediction = predict_memory(source, skeleton, recipe, targets, options)
    mode = choose_mode(prediction, options, recipe)
    options = replace(options, shard=shard_wanted(options, mode, prediction))
    log.info("predicted peak: whole-model %s, sequential %s; running %s", gib(prediction.whole_model),
             "-" if prediction.sequential is None else gib(prediction.sequential), mode)
    del skeleton
    if mode == "sequential":
        return run_recipe_sequential(source, recipe, targets, out, options, progress, force, prediction, peak)
    with progress.task("loading checkpoint"):
        ckpt = load_source(source, options.dtype, trainable=True)  # a compressed input is compressed further
    return run_recipe(ckpt, recipe, out, options, progress, force, prediction=prediction, peak=peak,
                      keep_model=options.dry_run)
