"""Data-parallel and sharded recovery: MiniLM fine-tuning on 1 process, on N processes (torchrun), and on
N processes with the training state sharded (FSDP2, --shard), side by side.

The same recipe, global batch, seed and steps run as a plain `compress run`, as `compress run --nproc N`
(torch.distributed.run, gloo on the CPU, NCCL on CUDA) and as `compress run --nproc N --shard`; the table
gives the fine-tune stage's steps per second (each rank's, from report.json; so loading, saving and the
reload check are left out), its final loss, and each rank's peak resident memory from the run's start to
the end of the fine-tune (the teacher, the data and the model are in it too, so sharding only removes a
rank's share of the gradients and AdamW moments from it). Every process runs with OMP_NUM_THREADS
(default 1, what torchrun gives its workers), so 1 process uses that many cores and N processes N times
as many. The losses should agree to a few digits (the ranks split each batch, and MiniLM's dropout
draws other masks per rank); sharded and data-parallel runs compute the same sums, so their losses
should agree to the last digits. The speed-up is what the devices allow: on a machine with 2 CPU
cores, 2 processes share the cores one process used, so they cannot be faster, and the table measures
the collectives' overhead instead (sharding adds an all-gather per block and a reduce-scatter of its
gradients per step). On a GPU per rank, steps/s scales with N.

    python benchmarks/distributed.py                                  # CPU, 1 vs 2 processes, 2 sharded
    python benchmarks/distributed.py --device cuda --nproc 8 --steps 200 --batch-size 64
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = ("stages:\n  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5}\n"
          "  - method: finetune\n    params: {steps: STEPS, lr: 1.0e-4}\n")


def run(nproc: int, shard: bool, recipe: Path, args: argparse.Namespace, work: Path) -> dict:
    command = [sys.executable, "-m", "compresscli", "run", "ref:minilm", "--recipe", str(recipe), "--out",
               str(work / f"out-{nproc}-{shard}"), "--force", "--no-eval", "--device", args.device, "--batch-size",
               str(args.batch_size), "--max-length", str(args.max_length), "--json"]
    if nproc > 1:
        command += ["--nproc", str(nproc), "--shard" if shard else "--no-shard"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # torchrun's default for its workers, for both
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"compress run on {nproc} process(es) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)["report"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel and sharded runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch, split across the processes")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as work:
        recipe = Path(work) / "recipe.yaml"
        recipe.write_text(RECIPE.replace("STEPS", str(args.steps)))
        for nproc, shard in ((1, False), (args.nproc, False), (args.nproc, True)):
            report = run(nproc, shard, recipe, args, Path(work))
            stats = report["stages"][-1]["stats"]
            execution = report["execution"]
            rates = stats["steps_per_second_per_rank"]
            peaks = ", ".join(f"{p / 1024**2:.0f}" for p in stats["peak_rss_bytes_per_rank"])
            rows.append((nproc, execution["backend"] or "-", "yes" if execution["sharded"] else "no", report["device"],
                         ", ".join(f"{r:.2f}" for r in rates), min(rates), stats["first_loss"], stats["final_loss"],
                         peaks))
    lines = [f"MiniLM fine-tune (MLPs 50% magnitude first), global batch {args.batch_size}, {args.steps} steps, "
             f"max length {args.max_length}; made by `python benchmarks/distributed.py --device {args.device} "
             f"--nproc {args.nproc} --steps {args.steps} --batch-size {args.batch_size}`; {args.threads} thread(s) per "
             "process", "",
             "| processes | backend | sharded | device | steps/s per rank | steps/s (slowest rank) | first loss | "
             "final loss | peak RSS per rank (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, backend, sharded, device, rates, slowest, first, final, peaks in rows:
        lines.append(f"| {n} | {backend} | {sharded} | {device} | {rates} | {slowest:.2f} | {first:.5f} | {final:.5f} "
                     f"| {peaks} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
