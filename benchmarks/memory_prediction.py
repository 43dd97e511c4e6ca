"""Predicted vs measured peak memory (RSS) of `compress run`, whole-model and block by block.

Each run is a fresh `compress run --json` process, so its report's measured peak (VmHWM) is the
run's alone; the prediction is what `--dry-run` would print. Prints one table (markdown).

    python benchmarks/memory_prediction.py [--out benchmarks/results/memory_prediction.md]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {
    "magnitude-layer-50": "stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5, scope: layer}\n",
    "magnitude-block-50+finetune": ("stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5, scope: block}\n"
                                    "  - method: finetune\n    params: {steps: 4}\n"),
    "condensed-activation-90": "stages:\n  - method: condensed\n    targets: [mlp]\n    params: {score: activation}\n",
    "sparsegpt-50+reconstruct": ("stages:\n  - method: sparsegpt\n    targets: [mlp]\n    params: {sparsity: 0.5}\n"
                                 "  - method: reconstruct\n    params: {steps: 4}\n"),
    "fips-40": "stages:\n  - method: fips\n    targets: [mlp]\n    params: {budget: 0.4, steps: 10}\n",
}
RUNS = [  # (checkpoint, recipe, extra flags)
    ("ref:minilm", "magnitude-layer-50", ["--whole-model"]),
    ("ref:minilm", "magnitude-layer-50", ["--sequential"]),
    ("ref:minilm", "magnitude-block-50+finetune", ["--whole-model"]),
    ("ref:minilm", "condensed-activation-90", ["--whole-model"]),
    ("ref:minilm", "condensed-activation-90", ["--sequential"]),
    ("ref:minilm", "fips-40", ["--whole-model"]),
    ("ref:minilm", "fips-40", ["--sequential"]),
    ("ref:minilm", "sparsegpt-50+reconstruct", ["--whole-model"]),
    ("ref:minilm", "sparsegpt-50+reconstruct", ["--sequential"]),
]


def run_one(checkpoint: str, recipe: str, flags: list[str], work: Path, extra: list[str]) -> dict:
    recipe_path = work / f"{recipe}.yaml"
    recipe_path.write_text(RECIPES[recipe])
    out = work / f"out-{len(list(work.iterdir()))}"
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "compresscli", "run", checkpoint, "--recipe", str(recipe_path),
                           "--out", str(out), "--json", *flags, *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{checkpoint} {recipe} {flags} failed:\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)["report"]
    execution = report["execution"]
    return {"checkpoint": checkpoint, "recipe": recipe, "mode": execution["mode"],
            "measured": execution["peak_rss_bytes"], "predicted": execution["predicted_peak_bytes"],
            "baseline": execution["prediction"]["baseline"], "seconds": round(time.time() - started, 1)}


def table(rows: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["| checkpoint | recipe | mode | predicted peak MiB | measured peak MiB | predicted / measured | "
             "runtime before the run MiB | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['recipe']} | {r['mode']} | {mib(r['predicted'])} | {mib(r['measured'])} "
                     f"| {r['predicted'] / r['measured']:.2f} | {mib(r['baseline'])} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--eval-examples", default="64")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for checkpoint, recipe, flags in RUNS:
            rows.append(run_one(checkpoint, recipe, flags, Path(tmp), ["--eval-examples", args.eval_examples]))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print("\n" + text)
    if args.out:
        args.out.write_text(f"Command: python benchmarks/memory_prediction.py --out {args.out}\n\n{text}\n")


if __name__ == "__main__":
    main()
