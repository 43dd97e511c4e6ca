"""Recovery throughput on the real MiniLM: fine-tuning and block-wise reconstruction steps per second.

Each recovery runs as `compress run` does it (bf16 autocast on CUDA, fp32 on CPU), after a one-shot
stage that gives it something to recover; the figure is the stage's steps over its measured seconds
(report.json), so loading, saving and the reload check are left out; the stage's own set-up (the
teacher's outputs, reconstruct's capture of block inputs) is in, so use enough steps to amortise it. One run per recovery, in one
invocation, on one device:

    python benchmarks/training_throughput.py                          # CPU
    python benchmarks/training_throughput.py --device cuda --steps 200 --out benchmarks/results/gpu/training_throughput.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RECOVERIES = {  # name: recipe, with the recovery stage last (finetune's batch is the run's --batch-size)
    "finetune (distillation on the final output)":
        "stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5}\n"
        "  - method: finetune\n    params: {steps: STEPS}\n",
    "reconstruct (block by block)":
        "stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5}\n"
        "  - method: reconstruct\n    params: {steps: STEPS, batch_size: BATCH}\n",
}


def run(recipe: str, device: str, batch_size: int, work: Path) -> dict:
    path = work / "recipe.yaml"
    path.write_text(recipe)
    proc = subprocess.run([sys.executable, "-m", "compresscli", "run", "ref:minilm", "--recipe", str(path),
                           "--out", str(work / "out"), "--force", "--no-eval", "--device", device, "--batch-size", str(batch_size), "--json"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"compress run failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout)["report"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, template in RECOVERIES.items():
            recipe = template.replace("STEPS", str(args.steps)).replace("BATCH", str(args.batch_size))
            report = run(recipe, args.device, args.batch_size, Path(work))
            stage = report["stages"][-1]
            rows.append((name, report["device"], stage["seconds"], args.steps / stage["seconds"]))
    lines = [f"Recovery throughput, real MiniLM (MLPs 50% magnitude first), batch {args.batch_size}, "
             f"{args.steps} steps; made by `python benchmarks/training_throughput.py --device {args.device} "
             f"--steps {args.steps}`", "",
             "| recovery | device | stage seconds | steps/s |", "|---|---|---|---|"]
    lines += [f"| {name} | {device} | {seconds:.1f} | {rate:.2f} |" for name, device, seconds, rate in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
