"""`make gpu-check`: everything that needs a GPU, in one command that needs nothing prepared.

On a machine with CUDA: every `gpu`-marked test, then the GPU benchmarks (condensed layer products in
bf16, cuBLAS against the Triton kernels; fine-tuning and reconstruction throughput with bf16
autocast), their tables written under benchmarks/results/gpu/ and a summary in
benchmarks/results/gpu/gpu-check.md. Without CUDA it still runs the test selection (every test
skips, and says why) and then says which GPU parts it skipped; it writes no results then, so a
CPU run never overwrites a GPU one.

    python benchmarks/gpu_check.py             # what `make gpu-check` runs
"""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu"
BENCHMARKS = {  # result file: command (after the python executable)
    "condensed_layers.md": ["benchmarks/condensed_layers.py", "--device", "cuda"],
    "training_throughput.md": ["benchmarks/training_throughput.py", "--device", "cuda", "--steps", "200"],
}


def step(title: str, command: list[str]) -> tuple[int, float]:
    print(f"\n== {title}: {' '.join(command)}", flush=True)
    started = time.time()
    code = subprocess.run(command, cwd=ROOT).returncode
    return code, time.time() - started


def main() -> int:
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"torch {torch.__version__}, CUDA available: {cuda}, device: {device}")
    tests, tests_seconds = step("gpu-marked tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs"])
    if not cuda:
        reason = ("torch.cuda.is_available() is False" if torch.version.cuda
                  else f"this torch ({torch.__version__}) is built without CUDA")
        print(f"\nno CUDA device ({reason}): the gpu tests above were skipped, and the GPU benchmarks "
              f"({', '.join(BENCHMARKS)}) were not run; nothing was written")
        return tests if tests != 5 else 0  # 5: pytest collected nothing to run

    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = [("gpu-marked tests", "passed" if tests == 0 else f"FAILED (exit {tests})", tests_seconds)]
    for name, command in BENCHMARKS.items():
        code, seconds = step(name, [sys.executable, *command, "--out", str(RESULTS / name)])
        rows.append((name, "written" if code == 0 else f"FAILED (exit {code})", seconds))
    summary = [f"# gpu-check, {time.strftime('%Y-%m-%d')}", "",
               f"{device}; torch {torch.__version__} (CUDA {torch.version.cuda}); {platform.node()}", "",
               "| part | result | seconds |", "|---|---|---|"]
    summary += [f"| {part} | {result} | {seconds:.0f} |" for part, result, seconds in rows]
    (RESULTS / "gpu-check.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0 if all(result in ("passed", "written") for _, result, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
