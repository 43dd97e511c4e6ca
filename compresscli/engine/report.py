"""What a run gives back (RunResult) and leaves beside the weights: config.json (the source's, plus the
compression block), recipe.yaml, the tokenizer files, and the report (report.json; report.md for people)."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from compresscli.core.resources import PeakMemory
from compresscli.core.version import __version__
from compresscli.engine.options import RunOptions, StageRecord
from compresscli.engine.prediction import MemoryPrediction
from compresscli.engine.recipe import Recipe
from compresscli.engine.verify import ReloadCheck
from compresscli.io.checkpoint import Checkpoint
from compresscli.io.inspect import human_bytes, inspect_path, subset_totals
from compresscli.io.native import read_format
from compresscli.io.safetensors import TensorIndex
from compresscli.io.source import Source
from compresscli.training import distributed

@dataclass
class RunResult:
    model: nn.Module | None  # the compressed model (whole-model runs); None when it was never whole
    report: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)
    prediction: MemoryPrediction | None = None
    mode: str = "whole-model"
    rank: int = 0  # under torchrun, the rank that returned it; only rank 0's has a report


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "tokenizer.model", "merges.txt", "vocab.json")


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


def written_layers(directory: Path) -> list[str]:
    """Names of the compressed layers a written output holds (from its headers), sorted."""
    return sorted(read_format(TensorIndex.of_directory(directory), str(directory))[0])


def write_report(directory: Path, report: dict[str, Any]) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    (directory / "report.md").write_text(render_markdown(report))


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
    if peak.gpu_peak() is not None:
        record["gpu_peak_bytes"] = peak.gpu_peak()
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


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the same facts as report.json, for people."""
    src, mem = report["source"], report["memory"]
    lines = [f"# compresscli report: {src['name']}", "", f"{report['recipe']['description']}", "",
             f"- source: {src['name']} ({src['kind']}, {src['family']}), {human_bytes(src['file_bytes'])} on disk",
             f"- device: {report['device']}; total time {report['seconds']:.1f} s",
             _execution_line(report["execution"]),
             f"- reload check: {_reload_line(report['reload'])}", "", "## Stages", "",
             "| # | method | layers | seconds | summary |", "|---|---|---|---|---|"]
    for i, stage in enumerate(report["stages"]):
        summary = ", ".join(f"{k}={_fmt(v)}" for k, v in stage["stats"].items() if not isinstance(v, (dict, list)))
        lines.append(f"| {i} | {stage['method']} | {len(stage['modules'])} | {stage['seconds']:.1f} | {summary} |")
    t = mem["targeted"]
    lines += ["", "## Memory", "",
              "| | dense params | stored params | dense bytes | actual bytes | ratio |", "|---|---|---|---|---|---|",
              f"| targeted layers | {t['dense_params']:,} | {t['stored_params']:,} | {human_bytes(t['dense_bytes'])} | "
              f"{human_bytes(t['actual_bytes'])} | {t['ratio']:.3f} |",
              f"| whole model file | {mem['model']['dense_params']:,} | {mem['model']['stored_params']:,} | "
              f"{human_bytes(mem['model']['dense_bytes'])} | {human_bytes(mem['model']['file_bytes'])} | "
              f"{mem['model']['ratio']:.3f} |", "",
              f"Theoretical bytes of the targeted layers (stored values only, no indices): "
              f"{human_bytes(t['theoretical_bytes'])}.", ""]
    if report.get("eval"):
        ev = report["eval"]
        lines += [f"## Evaluation ({ev['data']}, {ev['examples']} held-out examples)", "",
                  "| metric | original | compressed |", "|---|---|---|"]
        for m in ev["metrics"]:
            lines.append(f"| {m['name']} | {_fmt(m['original'])} | {_fmt(m['compressed'])} |")
        if "paired" in ev:
            p = ev["paired"]
            lines.append(f"\nPaired accuracy difference {p['delta']:+.4f} (95% CI {p['ci95'][0]:+.4f} .. {p['ci95'][1]:+.4f}).")
    return "\n".join(lines) + "\n"


def _reload_line(reload: dict[str, Any]) -> str:
    """What the reload check compared and how close it came (older reports hold only the output difference)."""
    line = f"max abs output difference {reload['max_abs_diff']:.3g} on {reload['examples']} examples"
    if reload.get("relative_tolerance") is not None:
        line += (f" (tolerance {reload['relative_tolerance']:.3g} of the output scale); {reload['tensors_compared']} "
                 f"stored tensors bit for bit; both forms of every layer within "
                 f"{reload['forms_max_relative_diff']:.2g} in float32")
    return line


def _execution_line(execution: dict[str, Any]) -> str:
    """How the run went: mode, processes and backend (torchrun), and whether recovery was sharded."""
    size = execution["world_size"]
    processes = f"{size} processes ({execution['backend']})" if size > 1 else "1 process"
    sharded = "sharded (FSDP2)" if execution["sharded"] else "not sharded"
    return f"- execution: {execution['mode']}, {processes}, recovery {sharded}"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
