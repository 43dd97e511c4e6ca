"""`compress run` as a library call: plan, predict memory, pick the execution mode, compress, save,
verify, report.

Two modes run the same recipe. Whole-model (`run_recipe`): the model is loaded once, a frozen copy of
the original is kept only when a stage compares against it (distillation, block targets), and the
output is streamed to disk layer by layer. Block by block (sequential.py): the model is never in
memory whole. `compress_source` predicts the peak memory of both (memory.py) and runs the whole-model
path when it fits the budget, else the sequential one, else refuses before doing any work.

Under torchrun (distributed.py) every rank runs the same plan on the same data: one-shot stages on
every rank, their results then broadcast from rank 0 (`sync_modules`, which counts any difference),
recovery stages data-parallel (training.py), or sharded with FSDP2 (sharding.py: --shard, or when a rank's
training state would not fit). Only rank 0 writes OUT, verifies and evaluates, once
every rank has finished; the others wait for its verdict, so a failure anywhere fails every rank.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__, distributed, sharding
from .architectures import Architecture, detect
from .checkpoint import Checkpoint, load_compressed, load_source
from .data import prepare_data
from .errors import CompressError, RecipeError, StageError
from .evaluate import compare
from .export import FORMAT_METADATA, compressed_layers, write_model
from .memory import MemoryPrediction, PeakMemory, available_memory, explain_out_of_memory, predict_memory
from .methods import StageContext, compress_
from .modules import CompressedModule
from .progress import Progress, SilentProgress
from .recipe import Recipe, Stage
from .report import inspect_path, render_markdown, subset_totals
from .safetensors_io import ShardWriter, atomic_directory, output_lock
from .source import Source, open_source, skeleton_of
from .tasks import Task, compute_dtype
from .verify import ReloadCheck

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "tokenizer.model", "merges.txt", "vocab.json")
DEFAULT_SHARD_BYTES = 2 * 1024**3
STAGE_FIX = "change the stage's targets or params"


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
    dtype: torch.dtype | None = None  # None: the checkpoint's own
    sequential: bool | None = None  # None: block by block only when the whole model would not fit
    max_memory: int | None = None  # bytes of host memory the run may use; None: what the machine has free
    block_inputs: str = "compressed"  # sequential: blocks read the compressed blocks' output, or the original's
    shard_bytes: int = DEFAULT_SHARD_BYTES  # outputs larger than this are written as shards with an index
    shard: bool | None = None  # recovery sharded across the ranks (FSDP2); None: when a rank's would not fit

    @property
    def resolved_device(self) -> str:
        return str(pick_device(self.device))

    def memory_budget(self) -> int:
        return self.max_memory if self.max_memory is not None else available_memory()

    def activation_bytes(self) -> int:
        """Sequential mode: activations kept in memory up to a quarter of the budget, the rest spill to disk."""
        return max(64 * 1024**2, self.memory_budget() // 4)


@dataclass
class StageRecord:
    """One stage of a run: what it matched and what it did to their size (summed over units when the run
    goes block by block)."""

    stage: int
    method: str
    modules: list[str]
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 2)}


@dataclass
class RunResult:
    model: nn.Module | None  # the compressed model (whole-model runs); None when it was never whole
    report: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)
    prediction: MemoryPrediction | None = None
    mode: str = "whole-model"
    rank: int = 0  # under torchrun, the rank that returned it; only rank 0's has a report


def pick_device(name: str) -> torch.device:
    """The device asked for; under torchrun a CUDA device is this rank's own (cuda:LOCAL_RANK)."""
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"--device {name} asked for, but no CUDA device is available", "use --device cpu or auto")
    return distributed.local_device(torch.device(name))


# ----------------------------------------------------------------------------- planning

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


def choose_mode(prediction: MemoryPrediction, options: RunOptions, recipe: Recipe) -> str:
    """"whole-model" or "sequential": as asked, else whichever fits the budget (whole-model first,
    unless a stage prefers block by block and the recipe can run so); a run that fits neither is
    refused with what to lower."""
    budget = options.memory_budget()
    if options.sequential is False:
        return "whole-model"
    prefers = any(stage.config.prefers_block_by_block for stage in recipe.stages)
    if prefers and options.sequential is None and prediction.sequential is not None \
            and prediction.sequential <= budget:
        return "sequential"
    if options.sequential or prediction.whole_model > budget:
        if prediction.sequential is None:
            raise CompressError(f"the whole-model run needs about {_gib(prediction.whole_model)} but "
                                f"{_gib(budget)} is available, and it cannot run block by block "
                                f"({prediction.sequential_problem})", "free memory, raise --max-memory, or "
                                "change the recipe")
        if prediction.sequential > budget:
            raise CompressError(f"even block by block the run needs about {_gib(prediction.sequential)} but "
                                f"{_gib(budget)} is available", "lower --calibration-examples, --max-length or "
                                "--batch-size, or raise --max-memory")
        return "sequential"
    return "whole-model"


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


# ----------------------------------------------------------------------------- entry point

def compress_source(source: Source, recipe: Recipe, out: Path | None, options: RunOptions,
                    progress: Progress | None = None, force: bool = False) -> RunResult:
    """Plan, predict, pick the mode and run. Nothing is read beyond headers until the mode is chosen.
    OUT is locked from the start (a second run writing it fails at once); running out of memory ends
    in a ResourceError saying what to lower, with nothing written. Under torchrun the process group
    lives for the call, and only rank 0 locks and writes OUT."""
    _check_out(source, out, options, force)
    writes = out is not None and not options.dry_run
    with distributed.process_group(pick_device(options.device)) as world:
        if not world.is_main:
            progress = SilentProgress()
        with output_lock(Path(out)) if writes and world.is_main else nullcontext(), \
                explain_out_of_memory("the run", OUT_OF_MEMORY_FIX):
            return _compress_source(source, recipe, out, options, progress or SilentProgress(), force)


OUT_OF_MEMORY_FIX = ("lower --batch-size, --calibration-examples or --max-length, run block by block (--sequential, "
                     "or a lower --max-memory), or free memory")


def _compress_source(source: Source, recipe: Recipe, out: Path | None, options: RunOptions, progress: Progress,
                     force: bool) -> RunResult:
    peak = PeakMemory()
    skeleton = skeleton_of(source)
    targets = resolve_targets(recipe, skeleton)
    if options.sequential:
        from .sequential import sequential_problem

        problem = sequential_problem(recipe, targets, detect(skeleton).blocks)
        if problem is not None:
            raise problem
    prediction = predict_memory(source, skeleton, recipe, targets, options)
    mode = choose_mode(prediction, options, recipe)
    options = replace(options, shard=sharding.wanted(options, mode, prediction))
    log.info("predicted peak: whole-model %s, sequential %s; running %s", _gib(prediction.whole_model),
             "-" if prediction.sequential is None else _gib(prediction.sequential), mode)
    del skeleton
    if mode == "whole-model":
        with progress.task("loading checkpoint"):
            ckpt = load_source(source, options.dtype, trainable=True)  # a compressed input is compressed further
        result = run_recipe(ckpt, recipe, out, options, progress, force, prediction=prediction, peak=peak,
                            keep_model=options.dry_run)
        del ckpt
    else:
        result = run_recipe_sequential(source, recipe, targets, out, options, progress, force, prediction, peak)
    return result


def _check_out(source: Source, out: Path | None, options: RunOptions, force: bool) -> None:
    if out is None or options.dry_run:
        return
    out = Path(out)
    if out.exists() and not force:
        raise CompressError(f"output {out} already exists", "choose another --out, or pass --force to replace it")
    if source.directory is not None and out.resolve() == source.directory.resolve():
        raise CompressError(f"--out {out} is the checkpoint being compressed", "write the output somewhere else")


# ----------------------------------------------------------------------------- whole-model path

def run_recipe(ckpt: Checkpoint, recipe: Recipe, out: Path | None, options: RunOptions,
               progress: Progress | None = None, force: bool = False,
               prediction: MemoryPrediction | None = None, peak: PeakMemory | None = None,
               keep_model: bool = True) -> RunResult:
    """Compress `ckpt` (held whole) with `recipe`; write OUT atomically unless dry-run. `ckpt.model` is
    modified in place; with keep_model=False it is released once saved (ckpt.model and result.model
    become None), so verification and evaluation never hold it beside its reloaded copy. `peak`
    measures from where the caller started (default: from here)."""
    progress = progress or SilentProgress()
    started, peak = time.time(), peak or PeakMemory()
    device = pick_device(options.device)
    torch.manual_seed(options.seed)
    model = ckpt.model
    task = ckpt.task()
    if ckpt.source is not None:
        _check_out(ckpt.source, out, options, force)
    elif out is not None and Path(out).exists() and not force and not options.dry_run:
        raise CompressError(f"output {out} already exists", "choose another --out, or pass --force to replace it")
    targets = resolve_targets(recipe, model)
    world = distributed.world()

    keep_original = not options.dry_run and any(s.config.needs_original() for s in recipe.stages)
    teacher = _frozen_copy(model).to(device) if keep_original else None
    model.to(device)
    ctx = StageContext(teacher=teacher, task=task, device=device, progress=progress, dry_run=options.dry_run,
                       seed=options.seed, shard=bool(options.shard))
    batcher = splits = data_name = None
    if needs_data(recipe, options):
        with progress.task("loading data"):
            batcher, splits, data_name = prepare_data(ckpt, task, options.data, options.max_length)
            ctx = StageContext(teacher=teacher, task=task, device=device, progress=progress, dry_run=options.dry_run,
                               seed=options.seed, shard=bool(options.shard),
                               train=batcher.batches(splits.train, options.batch_size),
                               calibration=batcher.batches(splits.calibration, options.batch_size,
                                                           options.calibration_examples))

    records = []
    for i, (stage, names) in enumerate(zip(recipe.stages, targets)):
        record = StageRecord(i, stage.method, names, params_before=stored_params(model, names),
                             bytes_before=layer_bytes(model, names))
        t0 = time.time()
        wanted = set(names)
        try:
            record.stats = compress_(model, stage.config, (lambda m, n: n in wanted) if names else None, ctx)
        except StageError as err:
            raise RecipeError(f"{recipe.source}: stage {i} ({stage.method}): {err.problem}",
                              err.fix or STAGE_FIX) from None
        if world.distributed and stage.config.compresses:
            record.stats["ranks_differed"] = distributed.sync_modules(
                {n: model.get_submodule(n) for n in names} or {"": model}, f"stage {i} ({stage.method})")
        record.seconds = time.time() - t0
        record.params_after, record.bytes_after = stored_params(model, names), layer_bytes(model, names)
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
    model = None  # result.model holds it: _save_whole_model may release it
    with distributed.writer_outcome() as everyone_done:
        everyone_done()
        _save_whole_model(ckpt, recipe, out, options, progress, force, result, batcher, splits, data_name, device,
                          task, started, peak, prediction, keep_model)
    return result


def _save_whole_model(ckpt: Checkpoint, recipe: Recipe, out: Path, options: RunOptions, progress: Progress,
                      force: bool, result: RunResult, batcher, splits, data_name, device: torch.device, task: Task,
                      started: float, peak: PeakMemory, prediction: MemoryPrediction | None, keep_model: bool) -> None:
    """Write OUT atomically, check that it reloads to the same outputs, evaluate, and report."""
    model, records = result.model, result.stages

    eval_batches = batcher.batches(splits.eval, options.batch_size, options.eval_examples) if batcher else []
    check_batch = eval_batches[0] if eval_batches else _synthetic_check_batch(model, task)
    family, layers = detect(model).family, sorted(compressed_layers(model))
    with progress.task("saving and verifying"), atomic_directory(Path(out), force=force) as tmp:
        writer = ShardWriter(tmp, options.shard_bytes, FORMAT_METADATA)
        write_model(model, writer)
        writer.close()
        write_side_files(tmp, ckpt, recipe, layers)
        with torch.no_grad():
            expected = task.outputs(model.eval(), {k: v.to(device) for k, v in check_batch.items()}).float().cpu()
        dtype, depth = compute_dtype(model), max(1, len(detect(model).blocks))
        if not keep_model:  # the file holds it now: the reloaded copy replaces it rather than joining it
            ckpt.model = result.model = model = None
        compressed = load_compressed(open_source(tmp), options.dtype).model.to(device)
        check = ReloadCheck(writer.checksums)
        check.visit(compressed)
        with torch.no_grad():
            got = task.outputs(compressed.eval(), {k: v.to(device) for k, v in check_batch.items()}).float().cpu()
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
        report = build_report(ckpt.source or ckpt, ckpt.name, ckpt.kind, family, recipe, records, tmp, set(layers),
                              check, check_batch, evaluation, device, started,
                              lambda: execution(result.mode, peak, prediction, options))
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(render_markdown(report))
    result.report = report


def _frozen_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def _original_for_eval(ckpt: Checkpoint, options: RunOptions) -> nn.Module:
    """The original, read again from its files (the compressed model replaced it in memory)."""
    if ckpt.source is None:
        raise CompressError(f"{ckpt.name} has no files to read the original back from for evaluation",
                            "load it with compresscli.checkpoint.load_checkpoint, or pass evaluate=False")
    return load_source(ckpt.source, options.dtype).model.eval()


def _synthetic_check_batch(model: nn.Module, task: Task) -> dict[str, torch.Tensor]:
    """Inputs for the reload check when no data was loaded: random pixels or token ids."""
    from .speed import synthetic_batch

    return synthetic_batch(model, task, 2)


# ----------------------------------------------------------------------------- sequential path

def run_recipe_sequential(source: Source, recipe: Recipe, targets: list[list[str]], out: Path | None,
                          options: RunOptions, progress: Progress | None = None, force: bool = False,
                          prediction: MemoryPrediction | None = None, peak: PeakMemory | None = None) -> RunResult:
    """Block by block (sequential.py), written atomically; the reload check streams OUT again."""
    from .sequential import run_sequential
    from .streamed_model import stream_outputs

    progress = progress or SilentProgress()
    started, peak = time.time(), peak or PeakMemory()
    device = pick_device(options.device)
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
        layers = sorted(inspect_layers(tmp))
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
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(render_markdown(report))
    return RunResult(None, report, records, prediction, "sequential")


def inspect_layers(directory: Path) -> list[str]:
    """Names of the compressed layers a written output holds (from its headers)."""
    from .export import read_format
    from .safetensors_io import TensorIndex

    return list(read_format(TensorIndex.of_directory(directory), str(directory))[0])


# ----------------------------------------------------------------------------- output and report

def write_side_files(tmp: Path, origin: Checkpoint | Source, recipe: Recipe, layers: list[str]) -> None:
    """config.json (the source config plus the compression block), recipe.yaml and tokenizer files."""
    source = origin.source if isinstance(origin, Checkpoint) else origin
    kind = origin.kind if isinstance(origin, Checkpoint) else origin.model_kind
    model_class = origin.model_class if isinstance(origin, Checkpoint) else origin.model_class
    compression = {"tool": f"compresscli {__version__}", "source_kind": kind, "source": origin.name,
                   "model_class": model_class, "recipe": recipe.to_dict(), "layers": layers}
    if source is not None and source.pooling:
        compression["pooling"] = source.pooling
    (tmp / "config.json").write_text(json.dumps({**origin.config, "compression": compression}, indent=2, default=str))
    (tmp / "recipe.yaml").write_text(recipe.to_yaml())
    if origin.directory is not None:
        for name in TOKENIZER_FILES:
            if (origin.directory / name).is_file():
                shutil.copy2(origin.directory / name, tmp / name)


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


def execution(mode: str, peak: PeakMemory, prediction: MemoryPrediction | None, options: RunOptions,
              **extra: Any) -> dict[str, Any]:
    """How the run went: mode, measured peak beside the prediction, dtype, device."""
    record = {"mode": mode, "peak_rss_bytes": peak.peak(), "budget_bytes": options.memory_budget(),
              "dtype": str(options.dtype).removeprefix("torch.") if options.dtype else "as stored",
              "block_inputs": options.block_inputs if mode == "sequential" else None,
              **distributed.world().to_dict(), "sharded": bool(options.shard), **extra}
    if prediction is not None:
        record["predicted_peak_bytes"] = (prediction.sequential if mode == "sequential" else
                                          prediction.sharded if options.shard else prediction.whole_model)
        record["prediction"] = prediction.to_dict()
    if torch.cuda.is_available() and options.resolved_device.startswith("cuda"):
        record["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
        if prediction is not None and prediction.gpu:
            record["predicted_gpu_peak_bytes"] = prediction.gpu.get("sharded" if options.shard else mode)
    return record


def build_report(origin: Checkpoint | Source, name: str, kind: str, family: str, recipe: Recipe,
                 records: list[StageRecord], out: Path, targeted: set[str], check: ReloadCheck, check_batch, evaluation,
                 device, started: float, execution_record: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """report.json's content; `execution_record` is asked last, so the measured peak covers the report too."""
    memory = inspect_path(out)
    rows = memory["layers"]
    target_totals = subset_totals(rows, targeted)
    value_bytes = {r["name"]: r["dense_bytes"] / max(1, r["dense_params"]) for r in rows}
    target_totals["theoretical_bytes"] = int(sum(r["stored_params"] * value_bytes[r["name"]] for r in rows
                                                 if r["name"] in targeted))
    model_totals = {**memory["totals"], "ratio": memory["totals"]["file_bytes"] / max(1, memory["totals"]["dense_bytes"])}
    examples = len(next(iter(check_batch.values()))) if check_batch else 0
    source = origin.source if isinstance(origin, Checkpoint) else origin
    return {
        "tool": f"compresscli {__version__}",
        "source": {"name": name, "kind": kind, "family": family, "file_bytes": origin.file_bytes,
                   "notes": source.notes if source is not None else []},
        "recipe": recipe.to_dict(), "device": str(device), "seconds": round(time.time() - started, 1),
        "stages": [r.to_dict() for r in records], "execution": execution_record(),
        "memory": {"targeted": target_totals, "model": model_totals, "layers": rows},
        "reload": check.record(examples),
        "eval": evaluation,
    }
