"""Condensed layers with a fixed mask vs SRigL (`update: rigl`) vs SET (`update: set`) during recovery: the same
compression, the same recovery steps, learning rate, data and seed; only the mask schedule differs.

For each model and pattern (a sparsity of the MLP weights with constant fan-in, or 2:4), the original is
compressed by the `condensed` stage, recovered by `finetune` (or `reconstruct`), and evaluated on the held-out
split against the original (MiniLM: embedding cosine; digits ViT: accuracy). Each row also gives the recovery's
wall time and steps per second (update steps included), the fraction of mask entries that changed and the
process's peak RSS. `--reference sparsegpt` adds SparseGPT at the same pattern with the same recovery;
`--reference sparsegpt-rec` adds the bundled `sparsegpt-2-4-rec` / `sparsegpt-50-rec` pair instead: SparseGPT then
`reconstruct` with that recipe's settings (200 steps per block, its default lr), the issue's 2:4 target.
`--modes ""` runs the reference alone.

Results accumulate in a JSON file (one invocation per model and pattern keeps each locked job short), and
`--table` renders them:

    flock /tmp/timing.lock python benchmarks/condensed_dst.py --model minilm --patterns 0.9 --steps 200 \
        --json benchmarks/results/condensed_dst.json
    python benchmarks/condensed_dst.py --table benchmarks/results/condensed_dst.json > benchmarks/results/condensed_dst.md
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from compresscli import (
    CondensedConfig,
    FinetuneConfig,
    ReconstructConfig,
    SparseGPTConfig,
    StageContext,
    compress_,
)
from compresscli.core.resources import peak_rss
from compresscli.io.checkpoint import load_checkpoint
from compresscli.io.data import prepare_data
from compresscli.model.architecture import detect
from compresscli.model.metrics import compare

MODELS = {"minilm": ("ref:minilm", "pydoc", "embedding cosine to original"),
          "digits-vit": ("ref:digits-vit", "digits", "accuracy")}
MODES = ("none", "rigl", "set")


def pattern_params(pattern: str) -> dict:
    return {"n_m": [2, 4], "score": "activation"} if pattern == "2:4" else {"sparsity": float(pattern)}


def recovery_config(kind: str, steps: int, lr: float):
    return FinetuneConfig(steps=steps, lr=lr) if kind == "finetune" else ReconstructConfig(steps=steps, lr=lr)


def metric_of(evaluation: dict, name: str) -> float:
    return next(m["compressed"] for m in evaluation["metrics"] if m["name"] == name)


def run_one(original, task, ctx, eval_batches, device, metric, stage, recovery: FinetuneConfig | ReconstructConfig) -> dict:
    model = copy.deepcopy(original)
    names = set(detect(model).groups["mlp"])
    compress_(model, stage, lambda m, n: n in names, ctx)
    before = metric_of(compare(original, model, task, eval_batches, device), metric)
    torch.manual_seed(0)  # dropout draws alike in every run
    started = time.perf_counter()
    stats = compress_(model, recovery, None if isinstance(recovery, FinetuneConfig) else (lambda m, n: n in names), ctx)
    seconds = time.perf_counter() - started
    after = metric_of(compare(original, model, task, eval_batches, device), metric)
    return {"no_recovery": before, "recovered": after, "seconds": round(seconds, 1),
            "steps_per_second": stats["steps_per_second_per_rank"][0], "mask_changed": stats.get("mask_changed"),
            "ablated_neurons": stats.get("ablated_neurons"),
            "changed_per_layer": {name: row["changed"] for name, row in stats.get("mask_per_layer", {}).items()},
            "peak_rss": peak_rss()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", choices=list(MODELS), default="digits-vit")
    parser.add_argument("--patterns", default="0.8,0.9,0.95,2:4", help="sparsities, or 2:4")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--recovery", choices=["finetune", "reconstruct"], default="finetune")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--every", type=int, default=None, help="steps between updates (default: steps * 0.75 / 10)")
    parser.add_argument("--drop-fraction", type=float, default=0.3)
    parser.add_argument("--ablate", action="store_true", help="SRigL neuron ablation (min_salient 0.3) with rigl/set")
    parser.add_argument("--reference", choices=["sparsegpt", "sparsegpt-rec"], default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-examples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="append the rows to this file")
    parser.add_argument("--table", type=Path, default=None, help="render the rows of this file and exit")
    args = parser.parse_args()
    if args.table:
        print(render(json.loads(args.table.read_text())))
        return
    torch.set_num_threads(args.threads)
    source, data, metric = MODELS[args.model]
    ckpt = load_checkpoint(source)
    original, task, device = ckpt.model.eval(), ckpt.task(), torch.device("cpu")
    batcher, splits, _ = prepare_data(ckpt, task, data)
    ctx = StageContext(teacher=original, task=task, device=device, seed=0,
                       train=batcher.batches(splits.train, args.batch_size),
                       calibration=batcher.batches(splits.calibration, args.batch_size, 128))
    eval_batches = batcher.batches(splits.eval, args.batch_size, args.eval_examples)
    every = args.every or max(1, round(0.75 * args.steps / 10))
    recovery = recovery_config(args.recovery, args.steps, args.lr)
    rows = []
    for pattern in args.patterns.split(","):
        stages = {mode: CondensedConfig(**pattern_params(pattern), update=mode, every=every,
                                        drop_fraction=args.drop_fraction, ablate=args.ablate and mode != "none"
                                        and pattern != "2:4") for mode in args.modes.split(",") if mode}
        recoveries = dict.fromkeys(stages, recovery)
        if args.reference:
            stages[args.reference] = SparseGPTConfig(**({"n_m": [2, 4]} if pattern == "2:4" else {"sparsity": float(pattern)}))
            recoveries[args.reference] = ReconstructConfig() if args.reference == "sparsegpt-rec" else recovery
        for mode, stage in stages.items():
            done = recoveries[mode]
            row = {"model": args.model, "metric": metric, "pattern": pattern, "mode": mode, "recovery": done.method,
                   "steps": done.steps, "lr": done.lr, "every": every, "drop_fraction": args.drop_fraction,
                   "ablate": getattr(stage, "ablate", False), "threads": args.threads, "command": " ".join(sys.argv),
                   **run_one(original, task, ctx, eval_batches, device, metric, stage, done)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(old + rows, indent=1) + "\n")


def render(rows: list[dict]) -> str:
    lines = [("| model | pattern | recovery (steps, lr) | every, drop | mask | no recovery | recovered | vs fixed | "
              "recovery s | steps/s | vs fixed | mask changed (per layer min-max) | ablated |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fixed = {(r["model"], r["pattern"], r["recovery"], r["steps"]): r for r in rows if r["mode"] == "none"}
    for r in rows:
        base = fixed.get((r["model"], r["pattern"], r["recovery"], r["steps"]))
        delta = f"{r['recovered'] - base['recovered']:+.4f}" if base and r is not base else ""
        speed = f"{r['steps_per_second'] / base['steps_per_second']:.2f}x" if base and r is not base else ""
        mode = r["mode"] + (" + ablation" if r.get("ablate") else "")
        schedule = f"{r['every']}, {r['drop_fraction']:g}" if r["mode"] in ("rigl", "set") else "-"
        changed = r["mask_changed"] if r["mask_changed"] is not None else "-"
        if r.get("changed_per_layer"):
            per_layer = r["changed_per_layer"].values()
            changed = f"{changed} ({min(per_layer):.3f}-{max(per_layer):.3f})"
        ablated = r["ablated_neurons"] if r["ablated_neurons"] is not None else "-"
        lines.append(f"| {r['model']} | {r['pattern']} | {r['recovery']} ({r['steps']}, {r['lr']:g}) | {schedule} | "
                     f"{mode} | {r['no_recovery']:.4f} | {r['recovered']:.4f} | {delta} | {r['seconds']:.0f} | "
                     f"{r['steps_per_second']:.2f} | {speed} | {changed} | {ablated} |")
    per_layer = [r for r in rows if r.get("changed_per_layer")]
    if per_layer:
        lines += ["", "Fraction of each layer's mask entries not in the mask it started with:", ""]
        for r in per_layer:
            lines.append(f"- {r['model']} {r['pattern']} {r['mode']} ({r['steps']} steps, every {r['every']}, drop "
                         f"{r['drop_fraction']:g}): " + ", ".join(f"{name} {value:.3f}" for name, value
                                                                  in r["changed_per_layer"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
