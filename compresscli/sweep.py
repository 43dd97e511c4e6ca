"""`compress sweep`: every method at every compression ratio, one recovery budget, one table.

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

from .architectures import detect
from .checkpoint import Checkpoint
from .errors import CompressError, DivergedError
from .finetune import FinetuneConfig
from .methods import METHODS, StageContext, compress_
from .methods.ltr import ltr_schedule
from .pipeline import RunOptions, layer_bytes, resolve_stage_targets, run_recipe
from .recipe import Recipe, Stage, make_config
from .registry import did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepMethod:
    method: str  # the recipe method it runs
    knob: str  # the parameter that sets the size
    low: float  # knob range searched
    high: float
    fixed: dict[str, Any] = field(default_factory=dict)
    log_scale: bool = False


SWEEP_METHODS: dict[str, SweepMethod] = {
    "magnitude": SweepMethod("magnitude", "sparsity", 0.0, 0.9999, {"score": "magnitude"}),
    "snip": SweepMethod("magnitude", "sparsity", 0.0, 0.9999, {"score": "snip"}),
    "synflow": SweepMethod("magnitude", "sparsity", 0.0, 0.9999, {"score": "synflow"}),
    "grasp": SweepMethod("magnitude", "sparsity", 0.0, 0.9999, {"score": "grasp"}),
    "ltr": SweepMethod("ltr", "sparsity", 0.0, 0.9999),
    "rps": SweepMethod("rps", "compression", 1.0, 10000.0, log_scale=True),
    "fips": SweepMethod("fips", "budget", 0.0005, 1.0, log_scale=True),
    "condensed": SweepMethod("condensed", "sparsity", 0.0, 0.9999),
}
# Methods whose storage is the same as magnitude's at equal sparsity share its knob search.
SAME_STORAGE_AS_MAGNITUDE = {"snip", "synflow", "grasp", "ltr"}


@dataclass
class SweepOptions:
    methods: list[str]
    ratios: list[float]
    steps: int = 200  # recovery steps for every run (LTR spreads the same total over its rounds)
    lr: float = 1.0e-4
    targets: list[str] = field(default_factory=lambda: ["mlp"])
    keep_checkpoints: bool = False
    run: RunOptions = field(default_factory=RunOptions)


def check_methods(names: list[str]) -> None:
    """Refuse, by name, what this build cannot run (never skip silently)."""
    for name in names:
        if name not in SWEEP_METHODS:
            raise CompressError(f"unknown sweep method {name!r}", did_you_mean(name, list(SWEEP_METHODS)))
        if SWEEP_METHODS[name].method not in METHODS:
            raise CompressError(f"method {name!r} is not implemented in this version of compresscli",
                                f"drop it from --methods; available: {', '.join(m for m in SWEEP_METHODS if SWEEP_METHODS[m].method in METHODS)}")


def stage_config(name: str, knob_value: float, options: SweepOptions):
    spec = SWEEP_METHODS[name]
    params = {**spec.fixed, spec.knob: knob_value}
    if name == "ltr":  # the same total recovery budget, spread over the rounds and the final recovery
        rounds = max(1, len(ltr_schedule(knob_value, 0.2)))
        per_round = options.steps // (rounds + 1)
        params.update(round_steps=per_round, final_steps=options.steps - rounds * per_round, lr=options.lr)
    if name == "fips":  # its block-wise reconstruction is recovery too: half the budget, the finetune the rest
        params.update(steps=options.steps - finetune_steps(name, options))
    return make_config(spec.method, params)


def finetune_steps(name: str, options: SweepOptions) -> int:
    """Steps of the finetune stage after the method, so that every method gets `options.steps` in all."""
    if name == "ltr":
        return 0  # its recovery is part of its own stage
    return options.steps - (options.steps // 2 if name == "fips" else 0)


def measured_ratio(model: nn.Module, names: list[str], name: str, knob_value: float, options: SweepOptions,
                   ctx: StageContext) -> float:
    """Dense bytes / encoded bytes of the targets after a dry run of the compression stage."""
    trial = copy.deepcopy(model)
    dense = layer_bytes(trial, names)
    wanted = set(names)
    try:
        compress_(trial, stage_config("magnitude" if name in SAME_STORAGE_AS_MAGNITUDE else name, knob_value,
                                      options), lambda m, n: n in wanted, ctx)
    except ValueError:  # too small to build (e.g. a FiPS budget that leaves rank 0): beyond any ratio
        return math.inf
    return dense / max(1, layer_bytes(trial, names))


def find_knob(model: nn.Module, names: list[str], name: str, ratio: float, options: SweepOptions,
              ctx: StageContext, iterations: int = 14) -> float | None:
    """The knob value whose encoded size is closest to `ratio` (None if the range cannot reach it)."""
    spec = SWEEP_METHODS[name]
    lo, hi = spec.low, spec.high
    f = (lambda v: measured_ratio(model, names, name, v, options, ctx))
    r_lo, r_hi = f(lo), f(hi)
    increasing = r_hi >= r_lo
    if not (min(r_lo, r_hi) <= ratio <= max(r_lo, r_hi)):
        return None
    for _ in range(iterations):
        mid = math.sqrt(lo * hi) if spec.log_scale else (lo + hi) / 2
        if (f(mid) < ratio) == increasing:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi) if spec.log_scale else (lo + hi) / 2


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
    check_methods(options.methods)
    out = Path(out)
    state_path = out / "sweep.json"
    if state_path.exists() and not resume:
        raise CompressError(f"{out} already holds a sweep", "pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads(state_path.read_text()) if state_path.exists() else {"runs": {}}
    state["config"] = {"source": ckpt.name, "methods": options.methods, "ratios": options.ratios,
                       "steps": options.steps, "lr": options.lr, "targets": options.targets,
                       "data": options.run.data, "seed": options.run.seed}
    original = ckpt.model
    arch = detect(original)
    probe = Stage(make_config("magnitude", {}), options.targets)
    names = resolve_stage_targets(probe, arch, original, "sweep targets")
    jobs = [(m, r) for m in options.methods for r in options.ratios]
    knob_cache: dict[tuple[str, float], float | None] = {}
    for i, (name, ratio) in enumerate(jobs):
        run_id = f"{name}-x{ratio:g}"
        if state["runs"].get(run_id, {}).get("status") in ("ok", "diverged"):
            continue  # done before the interruption; a failed run is tried again
        started = time.time()
        entry: dict[str, Any] = {"method": name, "target_ratio": ratio}
        try:
            key = ("magnitude" if name in SAME_STORAGE_AS_MAGNITUDE else name, ratio)
            if key not in knob_cache:
                knob_cache[key] = find_knob(original, names, key[0], ratio, options, StageContext(dry_run=True))
            knob = knob_cache[key]
            if knob is None:
                raise CompressError(f"{name} cannot reach {ratio:g}x on these targets")
            entry["knob"] = {SWEEP_METHODS[name].knob: knob}
            stages = [Stage(stage_config(name, knob, options), options.targets)]
            if finetune_steps(name, options):
                stages.append(Stage(FinetuneConfig(steps=finetune_steps(name, options), lr=options.lr), []))
            recipe = Recipe(f"sweep: {name} at {ratio:g}x", stages, f"sweep {run_id}")
            run_ckpt = copy.copy(ckpt)
            run_ckpt.model = copy.deepcopy(original)
            run_dir = out / "runs" / run_id
            report = run_recipe(run_ckpt, recipe, run_dir, options.run, force=True).report
            if not options.keep_checkpoints:
                (run_dir / "model.safetensors").unlink()
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


def write_outputs(out: Path, state: dict[str, Any]) -> None:
    from .sweep_plot import pareto_plot, sweep_markdown

    (out / "sweep.md").write_text(sweep_markdown(state))
    pareto_plot(state, out / "pareto.png")
