"""`compress sweep`: every method at every compression ratio, one recovery budget, one table.

Beside the ratio grid, `points` are recipes whose size their own settings fix (a quantized grid, a method
then `quantize`): each runs once, on the sweep's targets, its recovery stages given the sweep's steps, and is
placed where its measured bytes put it (every stage that trains gets the sweep's steps) (QUANTIZED_POINTS: quantize at 8/4/3/2 bits and the composed recipes).

"Compression ratio" means dense bytes of the targeted weights / their actual bytes on disk, for
every method alike. Each method exposes one knob (sparsity, compression factor, budget); the knob
for a ratio is found by bisection on dry runs (compress, no training) measuring real encoded
bytes, then the run itself reports the ratio it actually reached. The state is saved after every
run, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from compresscli.model.architecture import detect
from compresscli.io.checkpoint import Checkpoint
from compresscli.core.errors import CompressError, DivergedError, StageError
from compresscli.methods.finetune import FinetuneConfig
from compresscli.methods import METHODS, MethodConfig, StageContext, compress_
from compresscli.methods.base import SizeKnob
from compresscli.engine.report import TOKENIZER_FILES
from compresscli.engine.options import RunOptions
from compresscli.engine.stage import layer_bytes
from compresscli.engine.planning import resolve_stage_targets
from compresscli.engine.whole_model import run_recipe
from compresscli.engine.recipe import Recipe, Stage, load_recipe, make_config
from compresscli.core.registry import did_you_mean

log = logging.getLogger(__name__)

# `--points quantized`: the bundled quantized and composed recipes (issue 21's sweep points)
QUANTIZED_POINTS = ["gptq-int8", "gptq-int4", "gptq-int3", "gptq-int2", "sparsegpt-50-int4", "fips-40-int8",
                    "fips-40-int4", "rps-10-int8", "condensed-90-int8"]


@dataclass(frozen=True)
class SweepMethod:
    method: str  # the recipe method it runs
    knob: SizeKnob  # the parameter that sets the size, and its range
    fixed: dict[str, Any] = field(default_factory=dict)  # settings that make this entry (magnitude's score)
    storage: str = ""  # entries with the same storage share one knob search


def sweep_methods() -> dict[str, SweepMethod]:
    """Every entry a sweep can run, read from the registered methods' own declarations (size_knob,
    sweep_variants, storage_like): a new method needs no change here."""
    entries = {}
    for name in METHODS:
        config_cls = METHODS.get(name).config_cls
        if config_cls.size_knob is None:
            continue
        storage = config_cls.storage_like or name
        for entry, fixed in (config_cls.sweep_variants or {name: {}}).items():
            entries[entry] = SweepMethod(name, config_cls.size_knob, dict(fixed), storage)
    return entries


@dataclass
class SweepOptions:
    methods: list[str]
    ratios: list[float]
    steps: int = 200  # recovery steps for every run, split as each method declares (sweep_recovery)
    lr: float = 1.0e-4
    targets: list[str] = field(default_factory=lambda: ["mlp"])
    keep_checkpoints: bool = False
    run: RunOptions = field(default_factory=RunOptions)
    points: list[str] = field(default_factory=list)  # recipes run once each ("quantized": QUANTIZED_POINTS)

    def __post_init__(self) -> None:
        check_methods(self.methods)
        self.points = [p for name in self.points for p in (QUANTIZED_POINTS if name == "quantized" else [name])]
        for name in self.points:
            point_recipe(name, self)  # an unknown recipe or bad stage is refused before anything runs
        if self.methods and (not self.ratios or any(not r >= 1 for r in self.ratios)):
            raise CompressError(f"every ratio must be >= 1 (dense bytes / bytes on disk), got {self.ratios}",
                                "drop ratios below 1, e.g. --ratios 2,4,10")
        if self.steps < 0 or not self.lr > 0:
            raise CompressError(f"steps must be >= 0 and lr > 0, got {self.steps} and {self.lr}",
                                "pass --steps 0 or more and a positive --lr")


def check_methods(names: list[str]) -> None:
    """Refuse, by name, what this build cannot run (never skip silently)."""
    known = sweep_methods()
    for name in names:
        if name not in known:
            raise CompressError(f"unknown sweep method {name!r}", did_you_mean(name, list(known)))


def stage_config(spec: SweepMethod, knob_value: float, options: SweepOptions | None = None) -> MethodConfig:
    """The method's config at this knob value, with its part of the recovery budget when `options` says it."""
    params = {**spec.fixed, spec.knob.name: knob_value}
    config = make_config(spec.method, params)
    if options is not None:
        params.update(config.sweep_recovery(options.steps, options.lr)[0])
        config = make_config(spec.method, params)
    return config


def point_recipe(name: str, options: SweepOptions) -> Recipe:
    """Recipe `name` on the sweep's targets, each stage that trains (finetune, reconstruct, FiPS's own
    reconstruction) given the sweep's steps."""
    overrides = []
    for i, stage in enumerate(load_recipe(name).stages):
        if stage.targets:
            overrides.append(f"{i}.targets=[{', '.join(options.targets)}]")
        if hasattr(stage.config, "steps"):
            overrides.append(f"{i}.steps={options.steps}")
    recipe = load_recipe(name, overrides)
    return Recipe(f"sweep point: {name} ({recipe.description})", recipe.stages, f"sweep {name}")


def finetune_steps(config: MethodConfig, options: SweepOptions) -> int:
    """Steps of the finetune stage after the method, so that every method gets `options.steps` in all."""
    return config.sweep_recovery(options.steps, options.lr)[1]


def measured_ratio(model: nn.Module, names: list[str], spec: SweepMethod, knob_value: float,
                   ctx: StageContext) -> float:
    """Dense bytes / encoded bytes of the targets after a dry run of the compression stage."""
    trial = copy.deepcopy(model)
    dense = layer_bytes(trial, names)
    wanted = set(names)
    try:
        compress_(trial, stage_config(spec, knob_value), lambda m, n: n in wanted, ctx)
    except StageError:  # too small to build (e.g. a FiPS budget that leaves rank 0): beyond any ratio
        return math.inf
    return dense / max(1, layer_bytes(trial, names))


def find_knob(model: nn.Module, names: list[str], spec: SweepMethod, ratio: float, ctx: StageContext,
              iterations: int = 14) -> float | None:
    """The knob value whose encoded size is closest to `ratio` (None if the range cannot reach it). The
    search runs the entry's storage method with its defaults: entries that store alike share it."""
    search = SweepMethod(spec.storage, METHODS.get(spec.storage).config_cls.size_knob)
    lo, hi = search.knob.low, search.knob.high
    f = (lambda v: measured_ratio(model, names, search, v, ctx))
    r_lo, r_hi = f(lo), f(hi)
    increasing = r_hi >= r_lo
    if not (min(r_lo, r_hi) <= ratio <= max(r_lo, r_hi)):
        return None
    for _ in range(iterations):
        mid = math.sqrt(lo * hi) if search.knob.log_scale else (lo + hi) / 2
        if (f(mid) < ratio) == increasing:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi) if search.knob.log_scale else (lo + hi) / 2


def primary_metric(evaluation: dict[str, Any]) -> dict[str, Any]:
    names = [m["name"] for m in evaluation["metrics"]]
    for preferred in ("accuracy", "embedding cosine to original", "perplexity", "top-1 agreement"):
        if preferred in names:
            return evaluation["metrics"][names.index(preferred)]
    return evaluation["metrics"][0]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, path)


def run_sweep(ckpt: Checkpoint, options: SweepOptions, out: Path, resume: bool = False,
              on_run: Callable[[int, int, str, dict], None] | None = None) -> dict[str, Any]:
    """Run every (method, ratio); returns the state written to OUT/sweep.json."""
    out = Path(out)
    state_path = out / "sweep.json"
    if state_path.exists() and not resume:
        raise CompressError(f"{out} already holds a sweep", "pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads(state_path.read_text()) if state_path.exists() else {"runs": {}}
    state["config"] = {"source": ckpt.name, "methods": options.methods, "ratios": options.ratios, "points": options.points,
                       "steps": options.steps, "lr": options.lr, "targets": options.targets,
                       "data": options.run.data, "seed": options.run.seed}
    original = ckpt.model
    arch = detect(original)
    probe = Stage(make_config("magnitude", {}), options.targets)
    names = resolve_stage_targets(probe, arch, original, "sweep targets")
    jobs = [(m, r) for m in options.methods for r in options.ratios] + [(p, None) for p in options.points]
    knob_cache: dict[tuple[str, float], float | None] = {}
    specs = sweep_methods()
    for i, (name, ratio) in enumerate(jobs):
        run_id = name if ratio is None else f"{name}-x{ratio:g}"
        if state["runs"].get(run_id, {}).get("status") in ("ok", "diverged"):
            continue  # done before the interruption; a failed run is tried again
        started = time.time()
        entry: dict[str, Any] = {"method": name, "target_ratio": ratio, "point": ratio is None}
        try:
            recipe = point_recipe(name, options) if ratio is None else ratio_recipe(
                original, names, specs[name], ratio, options, knob_cache, entry)
            run_ckpt = copy.copy(ckpt)
            run_ckpt.model = copy.deepcopy(original)
            run_dir = out / "runs" / run_id
            report = run_recipe(run_ckpt, recipe, run_dir, options.run, force=True).report
            if not options.keep_checkpoints:  # keep the run's records, not a loadable checkpoint
                for name in ("model.safetensors", *TOKENIZER_FILES):
                    (run_dir / name).unlink(missing_ok=True)
            targeted = report["memory"]["targeted"]
            metric = primary_metric(report["eval"])
            entry.update(status="ok", metric=metric["name"], value=metric["compressed"], original=metric["original"],
                         stored_params=targeted["stored_params"], dense_params=targeted["dense_params"],
                         bytes=targeted["actual_bytes"], dense_bytes=targeted["dense_bytes"],
                         ratio=targeted["dense_bytes"] / targeted["actual_bytes"],
                         file_bytes=report["memory"]["model"]["file_bytes"])
        except DivergedError as err:
            entry.update(status="diverged", error=str(err))
        except CompressError as err:
            entry.update(status="failed", error=str(err))
        except (RuntimeError, ValueError) as err:  # a method failing on this model must not end the sweep
            log.exception("sweep run %s failed", run_id)
            entry.update(status="failed", error=f"{type(err).__name__}: {err}")
        entry["seconds"] = round(time.time() - started, 1)
        state["runs"][run_id] = entry
        _save_state(state_path, state)
        if on_run:
            on_run(i + 1, len(jobs), run_id, entry)
    write_outputs(out, state)
    return state


def ratio_recipe(original: nn.Module, names: list[str], spec: SweepMethod, ratio: float, options: SweepOptions,
                 knob_cache: dict[tuple[str, float], float | None], entry: dict[str, Any]) -> Recipe:
    """The method of `spec` at the knob that reaches `ratio` (found once per storage), then its finetune."""
    key = (spec.storage, ratio)
    if key not in knob_cache:
        knob_cache[key] = find_knob(original, names, spec, ratio, StageContext(dry_run=True))
    knob = knob_cache[key]
    if knob is None:
        raise CompressError(f"{entry['method']} cannot reach {ratio:g}x on these targets")
    entry["knob"] = {spec.knob.name: knob}
    config = stage_config(spec, knob, options)
    stages = [Stage(config, options.targets)]
    if finetune_steps(config, options):
        stages.append(Stage(FinetuneConfig(steps=finetune_steps(config, options), lr=options.lr), []))
    return Recipe(f"sweep: {entry['method']} at {ratio:g}x", stages, f"sweep {entry['method']}-x{ratio:g}")


def write_outputs(out: Path, state: dict[str, Any]) -> None:
    from compresscli.commands.sweep_plot import pareto_plot, sweep_markdown

    (out / "sweep.md").write_text(sweep_markdown(state))
    pareto_plot(state, out / "pareto.png")
