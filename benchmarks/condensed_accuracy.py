"""Condensed (constant fan-in) sparsity against unstructured magnitude pruning, same sparsity, same recovery.

For each model and sparsity of the MLP weights, every method runs the same pipeline: compress, then
the same `finetune` stage (same steps, learning rate, data, seed), export, reload check, evaluation on
the same held-out split. Scores are given without recovery (steps=0) and after it, with the bytes
the MLP tensors take on disk. All measured in this one run.

Methods:
  magnitude-global   unstructured, one global |W| threshold over the MLP weights (the tool's default)
  magnitude-layer    unstructured, the same sparsity in every layer
  condensed          constant fan-in: every neuron keeps its k = (1-s)*in largest |W|
  condensed-act      constant fan-in scored by |W| * ||X_j|| on calibration data
  condensed-ablate   condensed-act with SRigL neuron ablation (min_salient 0.3)

    python benchmarks/condensed_accuracy.py                                    # digits ViT 300 steps, MiniLM 40
    python benchmarks/condensed_accuracy.py --models digits-vit --vit-steps 300 --sparsities 0.8,0.9
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from compresscli.io.checkpoint import load_checkpoint
from compresscli.engine.options import RunOptions
from compresscli.engine.whole_model import run_recipe
from compresscli.engine.recipe import parse_recipe
from compresscli.io.inspect import human_bytes

MODELS = {"minilm": ("ref:minilm", "pydoc", "embedding cosine to original"),
          "digits-vit": ("ref:digits-vit", "digits", "accuracy")}
METHODS = {
    "magnitude-global": "method: magnitude\n    targets: [mlp]\n    params: {{sparsity: {s}, scope: global}}",
    "magnitude-layer": "method: magnitude\n    targets: [mlp]\n    params: {{sparsity: {s}, scope: layer}}",
    "condensed": "method: condensed\n    targets: [mlp]\n    params: {{sparsity: {s}, score: magnitude}}",
    "condensed-act": "method: condensed\n    targets: [mlp]\n    params: {{sparsity: {s}, score: activation}}",
    "condensed-ablate": "method: condensed\n    targets: [mlp]\n    params: {{sparsity: {s}, score: activation, "
                        "ablate: true, min_salient: 0.3}}",
}


def recipe_text(method: str, sparsity: float, steps: int, lr: float) -> str:
    return (f"description: {method} at {sparsity}\nstages:\n  - {METHODS[method].format(s=sparsity)}\n"
            f"  - method: finetune\n    params: {{steps: {steps}, lr: {lr}}}\n")


def score(report: dict, metric: str) -> tuple[float, float]:
    m = next(m for m in report["eval"]["metrics"] if m["name"] == metric)
    return m["original"], m["compressed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default="digits-vit,minilm")
    parser.add_argument("--sparsities", default="0.8,0.9")
    parser.add_argument("--methods", default="magnitude-global,magnitude-layer,condensed,condensed-act")
    parser.add_argument("--vit-steps", type=int, default=300)
    parser.add_argument("--minilm-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-4, help="recovery learning rate, the same for every method")
    parser.add_argument("--eval-examples", type=int, default=None, help="cap on held-out examples (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    steps = {"minilm": args.minilm_steps, "digits-vit": args.vit_steps}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in args.models.split(","):
        source, data, metric = MODELS[name]
        original = load_checkpoint(source)
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            for method in methods:
                results = {}
                for label, n_steps in (("pruned", 0), ("recovered", steps[name])):
                    ckpt = copy.copy(original)
                    ckpt.model = copy.deepcopy(original.model)
                    started = time.time()
                    with tempfile.TemporaryDirectory() as tmp:
                        report = run_recipe(ckpt, parse_recipe(recipe_text(method, sparsity, n_steps, args.lr)),
                                            Path(tmp) / "out", RunOptions(data=data, eval_examples=args.eval_examples,
                                                                          device=device)).report
                    results[label] = (report, time.time() - started)
                report = results["recovered"][0]
                t = report["memory"]["targeted"]
                base, pruned = score(results["pruned"][0], metric)
                _, recovered = score(report, metric)
                rows.append((name, metric, sparsity, method, base, pruned, recovered, steps[name], t["dense_bytes"],
                             t["actual_bytes"], results["recovered"][1]))
                print(f"done {name} s={sparsity} {method}: {pruned:.4f} -> {recovered:.4f}", flush=True)

    lines = [f"MLP weights at the same sparsity, then the same recovery (finetune: steps as given, lr {args.lr}, "
             f"seed 0), device {device}, {torch.get_num_threads()} threads. Eval: the held-out split "
             f"({'all of it' if args.eval_examples is None else f'at most {args.eval_examples} examples'}).", "",
             "| model | metric | sparsity | method | original | no recovery | recovered (steps) | MLP dense | "
             "MLP on disk | ratio | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, metric, s, method, base, pruned, rec, n, dense, actual, seconds in rows:
        lines.append(f"| {name} | {metric} | {s:.2f} | {method} | {base:.4f} | {pruned:.4f} | {rec:.4f} ({n}) | "
                     f"{human_bytes(dense)} | {human_bytes(actual)} | {actual / dense:.3f} | {seconds:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        command = "python " + " ".join(sys.argv)
        args.out.write_text(f"# Condensed vs unstructured magnitude pruning, after recovery\n\n    {command}\n\n{table}\n")


if __name__ == "__main__":
    main()
