"""Magnitude pruning of the MLP weights, before and after recovery, on the real MiniLM and digits ViT.

For each sparsity: the original's score, the pruned model's score with no recovery, the score
after distillation, and the bytes of the MLP tensors on disk (values + bitmask/CSR, everything the
file holds for them) against their dense bytes. All measured in this one run.

    python benchmarks/magnitude_recovery.py [--minilm-steps 100] [--vit-steps 300] [--sparsities 0.5,0.7,0.9]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from compresscli.io.checkpoint import load_checkpoint
from compresscli.engine.options import RunOptions
from compresscli.engine.whole_model import run_recipe
from compresscli.engine.recipe import load_recipe
from compresscli.io.inspect import human_bytes

MODELS = {"minilm": ("ref:minilm", "pydoc", "embedding cosine to original"),
          "digits-vit": ("ref:digits-vit", "digits", "accuracy")}


def score(report: dict, metric: str) -> tuple[float, float]:
    m = next(m for m in report["eval"]["metrics"] if m["name"] == metric)
    return m["original"], m["compressed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--minilm-steps", type=int, default=100)
    parser.add_argument("--vit-steps", type=int, default=300)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--models", default="minilm,digits-vit")
    args = parser.parse_args()
    steps = {"minilm": args.minilm_steps, "digits-vit": args.vit_steps}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in args.models.split(","):
        source, data, metric = MODELS[name]
        original = load_checkpoint(source)
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            results = {}
            for label, n_steps in (("pruned", 0), ("recovered", steps[name])):
                recipe = load_recipe("magnitude-50", [f"0.sparsity={sparsity}", f"1.steps={n_steps}"])
                ckpt = copy.copy(original)
                ckpt.model = copy.deepcopy(original.model)
                started = time.time()
                with tempfile.TemporaryDirectory() as tmp:
                    report = run_recipe(ckpt, recipe, Path(tmp) / "out",
                                        RunOptions(data=data, eval_examples=args.eval_examples, device=device)).report
                results[label] = (report, time.time() - started)
            report = results["recovered"][0]
            t = report["memory"]["targeted"]
            base, pruned = score(results["pruned"][0], metric)
            _, recovered = score(report, metric)
            rows.append((name, metric, sparsity, base, pruned, recovered, steps[name], t["dense_bytes"], t["actual_bytes"],
                         report["memory"]["model"]["file_bytes"], results["recovered"][1]))
            print(f"done {name} s={sparsity}", flush=True)

    print(f"\nMagnitude pruning of the MLP weights (global), device {device}\n")
    print("| model | metric | sparsity | original | pruned, no recovery | recovered (steps) | MLP dense | MLP on disk | ratio | whole file | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, metric, s, base, pruned, rec, n, dense, actual, file_bytes, seconds in rows:
        print(f"| {name} | {metric} | {s:.2f} | {base:.4f} | {pruned:.4f} | {rec:.4f} ({n}) | {human_bytes(dense)} | "
              f"{human_bytes(actual)} | {actual / dense:.3f} | {human_bytes(file_bytes)} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
