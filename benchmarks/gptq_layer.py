"""One GPTQ solve (int4, groups of 128, MSE scales, bf16 scales) of a Llama-shaped layer: seconds and minor
page faults, the best of two solves, on a random weight at the trained scale and a Hessian from 4096 random
inputs. What the OBS column sweep (methods/solvers/obs.py) costs per layer, apart from calibration.

    flock /tmp/timing.lock python benchmarks/gptq_layer.py [--shapes 5632x2048,2048x5632]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from compresscli.codecs.quant.grid import QuantSpec
from compresscli.methods.solvers.column_grid import ColumnGrid
from compresscli.methods.solvers.obs import MaskSpec, sparsegpt


def solve(rows: int, cols: int) -> tuple[float, int, float]:
    """(best seconds, minor faults of that solve, checksum of the codes) for a rows x cols layer."""
    torch.manual_seed(0)
    weight = torch.randn(rows, cols) / cols ** 0.5
    x = torch.randn(4096, cols)
    hessian = 2 * x.t() @ x / x.shape[0]
    best = (float("inf"), 0, 0.0)
    for _ in range(2):
        grid = ColumnGrid(QuantSpec(4, 128), rows, cols, torch.bfloat16, "mse")
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        sparsegpt(weight, hessian, MaskSpec(0.0), blocksize=128, grid=grid)
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        best = min(best, (seconds, faults, grid.codes.float().sum().item()))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="5632x2048,2048x5632")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}\n\n| layer (rows x cols) | seconds | minor page faults | codes checksum |")
    print("|---|---|---|---|")
    for shape in args.shapes.split(","):
        rows, cols = map(int, shape.split("x"))
        seconds, faults, checksum = solve(rows, cols)
        print(f"| {rows}x{cols} | {seconds:.2f} | {faults} | {checksum:.0f} |")


if __name__ == "__main__":
    main()
