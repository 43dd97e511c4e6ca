"""The block-by-block runner (`compress run --sequential`): the model is never in memory whole.

The skeleton of the model is built with its parameters on the meta device and only what lies
outside the repeated blocks (embeddings, final norm, head) is read (block_reader.py). The calibration,
check and evaluation batches are run up to the first block once (skeleton_forward.py); then, unit by unit (a
block, or a FiPS group of blocks), the original weights are read from the safetensors files, the
original block's outputs are computed where a stage needs them, the recipe's stages run on the
unit, the activations are carried through the compressed unit (or, with
`block_inputs="original"`, through the original one), the unit is written to its output shard and
freed. The teacher is never copied: the original block *is* the teacher until its stages run.

Stages that need the whole model at once say so (MethodConfig.whole_model_only) and are refused
before any work, with the block-local alternative (engine.planning.sequential_problem). Each stage runs
on each unit through engine.stage, as in the whole-model runner. The output is written atomically and
the reload check streams it back block by block.

Under torchrun every rank streams the same units (reconstruction trains data-parallel, one-shot
results are broadcast from rank 0 after each unit); the ranks that do not write (out_dir None) carry
no check or evaluation stream.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresscli.core.progress import Progress, SilentProgress
from compresscli.core.resources import PeakMemory
from compresscli.engine.activations import ActivationStore
from compresscli.engine.block_reader import Stream, StreamedModel, advance, capture_streams, stream_outputs
from compresscli.engine.options import RunOptions, StageRecord
from compresscli.engine.planning import calibration_chunk, plan_units, sequential_problem
from compresscli.engine.prediction import MemoryPrediction
from compresscli.engine.recipe import Recipe
from compresscli.engine.report import (RunResult, build_report, execution, write_report, write_side_files,
                                       written_layers)
from compresscli.engine.skeleton_forward import BlockStreamer
from compresscli.engine.stage import run_stage
from compresscli.engine.verify import ReloadCheck
from compresscli.io.data import prepare_data
from compresscli.io.native import FORMAT_METADATA, write_model
from compresscli.io.safetensors import ShardWriter, atomic_directory
from compresscli.io.source import Source, open_source, skeleton_of
from compresscli.methods import StageContext
from compresscli.methods.calibration import BlockIO, StopForward, split_batches, stopping_after, token_mask
from compresscli.model.architecture import Block, detect
from compresscli.model.inputs import synthetic_batch
from compresscli.model.metrics import compare_outputs
from compresscli.training import distributed

log = logging.getLogger(__name__)


class UnitCalibrator:
    """Calibration inside one unit: block i of the unit is fed `inputs[i]`, and its original output
    on them is `targets[i]` (both keys of the activation store)."""

    def __init__(self, streamer: BlockStreamer, store: ActivationStore, stream: Stream, blocks: list[Block],
                 inputs: dict[int, str], targets: dict[int, str]):
        self.streamer, self.store, self.stream = streamer, store, stream
        self.blocks, self.inputs, self.targets = blocks, inputs, targets

    def run(self, model: nn.Module, stop_after: nn.Module | None = None, limit: int | None = None) -> None:
        with stopping_after(stop_after):
            for block in self.blocks:
                module = model.get_submodule(block.name)
                stopped = False
                for c, chunk in enumerate(self.stream.calls[:limit]):
                    try:
                        self.streamer.run_block(module, block.index, chunk, self.store.get((self.inputs[block.index], c)))
                    except StopForward:
                        stopped = True
                if stopped:
                    return

    def block_io(self, block_names: list[str], chunk_size: int) -> list[list[BlockIO]]:
        by_name = {b.name: b.index for b in self.blocks}
        unknown = [n for n in block_names if n not in by_name]
        if unknown or any(by_name[n] not in self.targets for n in block_names):
            raise ValueError(f"no original outputs were kept for {unknown or block_names} (a bug in the engine)")
        data = []
        for c, chunk in enumerate(self.stream.calls):
            row = []
            for name in block_names:
                i = by_name[name]
                args, kwargs = chunk.calls[i].inputs(self.store.get((self.inputs[i], c)), "cpu")
                target = self.store.get((self.targets[i], c))
                row.append(BlockIO(args, kwargs, target, token_mask(self.stream.batches[c], target)))
            data.append(row)
        return data


def run_recipe_sequential(source: Source, recipe: Recipe, targets: list[list[str]], out: Path | None,
                          options: RunOptions, progress: Progress | None = None, force: bool = False,
                          prediction: MemoryPrediction | None = None, peak: PeakMemory | None = None) -> RunResult:
    """Block by block, written atomically; the reload check streams OUT again."""
    progress = progress or SilentProgress()
    device = distributed.pick_device(options.device)
    started, peak = time.time(), peak or PeakMemory(device)
    torch.manual_seed(options.seed)
    world = distributed.world()
    if options.dry_run or out is None or not world.is_main:  # the other ranks compute, rank 0 writes
        records, _ = run_sequential(source, recipe, targets, None, options, progress)
        if not options.dry_run and out is not None:
            distributed.wait_for_writer()
        return RunResult(None, {}, records, prediction, "sequential", rank=world.rank)
    with distributed.writer_outcome() as everyone_done, atomic_directory(Path(out), force=force) as tmp:
        records, outcome = run_sequential(source, recipe, targets, tmp, options, progress)
        everyone_done()
        layers = written_layers(tmp)
        write_side_files(tmp, source, recipe, layers)
        with progress.task("verifying the saved checkpoint"):
            check = ReloadCheck(outcome["checksums"])
            got = stream_outputs(open_source(tmp), [outcome["check_batch"]], options.dtype, device,
                                 visit=check.visit)[0]
            arch = detect(skeleton_of(source))
            check.outputs(outcome["check_output"], got, options.dtype or source.stored_dtype(), max(1, len(arch.blocks)))
        family = arch.family
        report = build_report(source, source.name, source.model_kind, family, recipe, records, tmp, set(layers), check,
                              outcome["check_batch"], outcome.get("eval"), device, started,
                              lambda: execution("sequential", peak, prediction, options, units=outcome["units"],
                                                spilled=outcome["activations_spilled_bytes"]))
        write_report(tmp, report)
    return RunResult(None, report, records, prediction, "sequential")


def run_sequential(source: Source, recipe: Recipe, targets: list[list[str]], out_dir: Path | None,
                   options: RunOptions, progress: Progress | None = None) -> tuple[list[StageRecord], dict[str, Any]]:
    """Compress `source` unit by unit into `out_dir` (a temporary directory the caller renames; None for
    a dry run, or a rank that does not write). Returns the stage records and what the report needs
    (eval, the model's output on the check batch for the reload check)."""

    progress = progress or SilentProgress()
    device = torch.device(options.resolved_device)
    streamed = StreamedModel(source, options.dtype, device, trainable=True)  # its blocks are compressed further
    problem = sequential_problem(recipe, targets, streamed.blocks)
    if problem is not None:
        raise problem
    model, blocks, task = streamed.model, streamed.blocks, streamed.task
    units = plan_units(recipe, targets, blocks)
    dry = options.dry_run
    writes = out_dir is not None and not dry
    needs_data = any(s.config.needs_data() for s in recipe.stages)
    evaluate = options.evaluate and writes
    batcher = splits = None
    data_name = None
    if needs_data or evaluate:
        with progress.task("loading data"):
            batcher, splits, data_name = prepare_data(streamed.as_checkpoint(), task, options.data, options.max_length)
    named: dict[str, list[dict[str, torch.Tensor]]] = {}
    if needs_data:
        chunk = calibration_chunk(recipe, options.batch_size)
        named["cal"] = split_batches(batcher.batches(splits.calibration, options.batch_size,
                                                     options.calibration_examples), chunk)
    eval_batches = batcher.batches(splits.eval, options.batch_size, options.eval_examples) if evaluate else []
    if writes:
        named["check"] = [eval_batches[0] if eval_batches else synthetic_batch(model, task, 2)]
    if evaluate:
        named["eval_o"] = eval_batches
    aliases = {"eval_c": "eval_o"} if evaluate else {}

    store = ActivationStore(options.activation_bytes(), spill_parent=out_dir,
                            pin=streamed.read_ahead is not None and streamed.read_ahead.pin)
    streamer = streamed.streamer()
    records = [StageRecord(i, s.method, names) for i, (s, names) in enumerate(zip(recipe.stages, targets))]
    writer = ShardWriter(out_dir, options.shard_bytes, FORMAT_METADATA) if out_dir is not None else None
    compressed_mode = options.block_inputs == "compressed"
    try:
        if named:
            with progress.task("running the batches up to the first block"):
                first = next(iter(named.values()))[0]
                probe = streamer.capture({k: v[:1] for k, v in first.items()}, blocks=1)
                streamer.learn_output(streamed.load_block(0), probe)
                streamed.free_block(0)
                streams = capture_streams(streamer, store, named, aliases)
        else:
            streams = {}
        with progress.task("compressing block by block", total=len(blocks)) as bar:
            for u, unit in enumerate(units):
                _run_unit(unit, streamed, streamer, store, streams, recipe, targets, records, options, progress,
                          compressed_mode, next_unit=units[u + 1] if u + 1 < len(units) else [])
                if writer is not None:
                    names = tuple(blocks[i].name + "." for i in unit)
                    write_model(model, writer, include=lambda n: (n + ".").startswith(names))
                for i in unit:
                    streamed.free_block(i)
                bar.advance(len(unit))
        result: dict[str, Any] = {"units": len(units), "activations_spilled_bytes": store.spilled_bytes,
                                  "checksums": writer.checksums if writer is not None else {}}
        if not writes:
            return records, result
        write_model(model, writer, include=streamed.outside_blocks)
        writer.close()
        check_batch = named["check"][0]
        result["check_batch"] = check_batch
        result["check_output"] = streamer.finish(check_batch, store.get(("check", 0))).float().cpu()
        if evaluate:
            with progress.task("evaluating original vs compressed"):
                triples = ((batch, streamer.finish(batch, store.get(("eval_o", c))).float(),
                            streamer.finish(batch, store.get(("eval_c", c))).float())
                           for c, batch in enumerate(eval_batches))
                result["eval"] = {"data": data_name, **compare_outputs(task, triples)}
        return records, result
    finally:
        store.close()
        streamed.close()


def _run_unit(unit: list[int], streamed: StreamedModel, streamer: BlockStreamer, store: ActivationStore,
              streams: dict[str, Stream], recipe: Recipe, targets: list[list[str]], records: list[StageRecord],
              options: RunOptions, progress: Progress, compressed_mode: bool, next_unit: list[int]) -> None:
    """Read the unit's blocks (and start reading the next unit's, on a GPU), compute what its stages need
    from the originals, run the stages, and carry every stream through the compressed (or original) unit."""
    model, blocks = streamed.model, streamed.blocks
    names_in_unit = tuple(blocks[i].name + "." for i in unit)
    stage_names = [[n for n in names if (n + ".").startswith(names_in_unit)] for names in targets]
    active = [(s, n, r) for s, n, r in zip(recipe.stages, stage_names, records) if n]
    wants_targets = any(s.config.needs_original() for s, _, _ in active) and not options.dry_run
    loaded = {i: streamed.load_block(i) for i in unit}
    streamed.prefetch(next_unit)

    # The original unit: block inputs (the unit's first block reads the carried stream, the others the
    # original outputs before them), the original outputs where stages need them, and the original
    # evaluation stream.
    cal = streams.get("cal")
    inputs = {unit[0]: "cal"}
    outputs: dict[int, str] = {}
    if cal is not None:
        for position, i in enumerate(unit):
            last = position == len(unit) - 1
            if wants_targets or not last or not compressed_mode:
                outputs[i] = f"y{i}"
                advance(streamer, store, cal, loaded[i], i, source_key=inputs[i], target_key=outputs[i])
            if not last:
                inputs[unit[position + 1]] = outputs[i]
    if "eval_o" in streams:
        for i in unit:
            advance(streamer, store, streams["eval_o"], loaded[i], i)

    calibrator = UnitCalibrator(streamer, store, cal, [blocks[i] for i in unit], inputs, outputs) if cal else None
    ctx = StageContext(task=streamed.task, device=streamed.device, progress=progress, dry_run=options.dry_run,
                       seed=options.seed, calibrator=calibrator)
    for stage, names, record in active:
        where = f"{recipe.source}: stage {record.stage} ({stage.method}) on {blocks[unit[0]].name}"
        record.stats.setdefault("per_unit", []).append(run_stage(model, stage, names, ctx, record, where))

    # Carry the streams through the unit as it now is.
    compressed = {i: model.get_submodule(blocks[i].name) for i in unit}
    for key in ("check", "eval_c") + (("cal",) if compressed_mode else ()):
        if key in streams:
            for i in unit:
                advance(streamer, store, streams[key], compressed[i], i)
    if cal is not None and not compressed_mode:
        for c in range(len(cal.calls)):
            store.put(("cal", c), store.get((outputs[unit[-1]], c)))
    for key in set(outputs.values()):
        for c in range(len(cal.calls) if cal else 0):
            store.drop((key, c))
