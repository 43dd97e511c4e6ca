"""Measure where each compiled CPU kernel stops beating decode + GEMM, and write the table dispatch reads.

For every structure (bitmask and CSR sparse rows, condensed rows, RPS weights), dtype (float32, bfloat16,
float16), density and layer shape, both CPU paths of kernels.dispatch are timed at 1, 2, 4, ... 512 input
rows: `cpu` (the kernel) and `decoded` (the weight decoded tile by tile for torch's GEMM). The threshold is
the largest row count up to which the kernel won at every measured count. Shapes fall in two classes by
their dense weight count (MiniLM's MLP "small", the Llama MLPs "large"); a class's threshold is the lowest
of its shapes'. Raw timings go to benchmarks/results/kernel_thresholds.json (merged across runs, so one
dtype can be measured at a time under the timing lock), the table to compresscli/kernels/cpu_thresholds.py
and a summary to benchmarks/results/kernel_thresholds.md.

    flock /tmp/timing.lock python benchmarks/kernel_thresholds.py --dtypes bfloat16 [--structures bitmask,csr]
    python benchmarks/kernel_thresholds.py --write-only   # regenerate the table from the JSON
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from compresscli.codecs.rps.hashing import Placement
from compresscli.codecs.sparse.matrix import CompactSparse
from compresscli.commands.bench import device_name, load_average
from compresscli.kernels import cpu, dispatch

ROOT = Path(__file__).resolve().parent
RAW = ROOT / "results" / "kernel_thresholds.json"
SUMMARY = ROOT / "results" / "kernel_thresholds.md"
TABLE = ROOT.parent / "compresscli" / "kernels" / "cpu_thresholds.py"
SHAPES = {"small": [(1536, 384), (384, 1536)], "large": [(5632, 2048), (2048, 5632), (11008, 4096)]}
SMALL_WEIGHTS = 1 << 21  # the class boundary: MiniLM's 0.6M weights below, the Llama MLPs' 11.5M-45M above
DENSITIES = {"bitmask": [0.1, 0.25, 0.5, 0.75], "csr": [0.02, 0.0625], "condensed": [0.1, 0.25, 0.5],
             "rps": [1.0]}
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _product(structure: str, rows: int, cols: int, density: float, dtype: torch.dtype):
    """A function (x, path) -> y running one layer of `structure` on the forced path."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(rows, cols, generator=generator) / cols ** 0.5).to(dtype)
    if structure in ("bitmask", "csr"):
        matrix = CompactSparse.from_masked(weight, torch.rand(rows, cols, generator=generator) < density, structure)
        return lambda x: matrix.mm(x)[0]
    if structure == "condensed":
        k = max(1, round(density * cols))
        indices = torch.rand(rows, cols, generator=generator).topk(k, dim=1).indices.sort(1).values.to(torch.int16)
        values = weight[:, :k].contiguous()
        return lambda x: dispatch.condensed_mm(x, values, indices, None, cols)[0]
    memory = (torch.randn(rows * cols // 10, generator=generator) / cols ** 0.5).to(dtype)
    spec = torch.tensor(Placement(memory.numel(), "randomfold", 0, 0, 0).kernel_spec((rows, cols)), dtype=torch.int64)
    return lambda x: dispatch.rps_mm(x, memory, spec, 1.0, None, rows, cols)[0]


def measure(structure: str, dtype_name: str, density: float, shape: tuple[int, int], repeats: int) -> dict:
    """Both paths' median ms at every row count, and the crossover."""
    rows, cols = shape
    dtype = DTYPES[dtype_name]
    run = _product(structure, rows, cols, density, dtype)
    timings, crossover, lost = [], 0, False
    for n in ROWS:
        x = torch.randn(n, cols).to(dtype)
        with torch.no_grad():
            ms = {}
            for path in ("cpu", "decoded"):
                with dispatch.force_path(path):
                    ms[path] = _median_ms(lambda: run(x), repeats if n <= 64 else max(3, repeats // 3))
        timings.append({"rows": n, **ms})
        if not lost and ms["cpu"] <= ms["decoded"]:
            crossover = n
        lost = lost or ms["cpu"] > ms["decoded"]
        if lost and ms["cpu"] > 2 * ms["decoded"]:
            break  # the kernel only falls further behind with more rows
    return {"structure": structure, "dtype": dtype_name, "density": density, "shape": list(shape),
            "crossover_rows": crossover, "timings": timings}


def table_from(raw: dict) -> dict:
    """{structure: {dtype: {density: {class: rows}}}}: per class, the lowest crossover of its shapes."""
    table: dict = {}
    for entry in raw["measurements"]:
        rows, cols = entry["shape"]
        size = "small" if rows * cols <= SMALL_WEIGHTS else "large"
        by_size = table.setdefault(entry["structure"], {}).setdefault(entry["dtype"], {}).setdefault(entry["density"], {})
        by_size[size] = min(by_size.get(size, 1 << 30), entry["crossover_rows"])
    return table


def write_outputs(raw: dict) -> None:
    table = table_from(raw)
    lines = ['"""Where each compiled CPU kernel beats decode + GEMM, as measured by benchmarks/kernel_thresholds.py',
             f"on {raw['machine']} ({raw['threads']} threads, torch {raw['torch']}, kernels built for {raw['isa']}).",
             "GENERATED: do not edit; rerun the script on the target machine to re-measure (results in",
             'benchmarks/results/kernel_thresholds.md)."""', "",
             f"SMALL_WEIGHTS = {SMALL_WEIGHTS}  # layers with at most this many dense weights are the \"small\" class", "",
             "# structure -> dtype -> measured density -> shape class -> the most input rows for which the kernel won",
             "KERNEL_MAX_ROWS = {"]
    for structure in sorted(table):
        lines.append(f"    {structure!r}: {{")
        for dtype in sorted(table[structure]):
            cells = ", ".join(f"{d}: {json.dumps(dict(sorted(v.items())))}" for d, v in sorted(table[structure][dtype].items()))
            lines.append(f"        {dtype!r}: {{{cells}}},")
        lines.append("    },")
    lines.append("}")
    TABLE.write_text("\n".join(lines) + "\n")
    md = ["# CPU kernel thresholds: compiled kernel (`cpu`) against decode + GEMM (`decoded`)", "",
          f"{raw['machine']}, {raw['threads']} threads, torch {raw['torch']}, kernels built for {raw['isa']}; "
          f"median ms per call. Command: `flock /tmp/timing.lock python benchmarks/kernel_thresholds.py "
          f"--dtypes D` per dtype. The table dispatch reads is compresscli/kernels/cpu_thresholds.py.", "",
          "| structure | dtype | density | shape | crossover rows | ms cpu / decoded at rows 1, 8, 64, 512 |",
          "|---|---|---|---|---|---|"]
    for e in sorted(raw["measurements"], key=lambda e: (e["structure"], e["dtype"], e["density"], e["shape"])):
        by_rows = {t["rows"]: t for t in e["timings"]}
        cells = " ; ".join(f"{n}: {by_rows[n]['cpu']:.3g}/{by_rows[n]['decoded']:.3g}" for n in (1, 8, 64, 512)
                           if n in by_rows)
        md.append(f"| {e['structure']} | {e['dtype']} | {e['density']} | {e['shape'][0]}x{e['shape'][1]} | "
                  f"{e['crossover_rows']} | {cells} |")
    SUMMARY.write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--structures", default=",".join(DENSITIES))
    parser.add_argument("--classes", default="small,large")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--write-only", action="store_true", help="only regenerate the table from the JSON")
    args = parser.parse_args()
    raw = json.loads(RAW.read_text()) if RAW.is_file() else {"measurements": []}
    if not args.write_only:
        torch.set_num_threads(args.threads)
        raw.update(machine=device_name(torch.device("cpu")), threads=args.threads, torch=torch.__version__,
                   isa=cpu.isa(), python=platform.python_version())
        for structure in args.structures.split(","):
            for dtype in args.dtypes.split(","):
                for density in DENSITIES[structure]:
                    for size in args.classes.split(","):
                        for shape in SHAPES[size]:
                            entry = {**measure(structure, dtype, density, shape, args.repeats),
                                     "load_average": load_average()}
                            raw["measurements"] = [e for e in raw["measurements"] if
                                                   (e["structure"], e["dtype"], e["density"], e["shape"]) !=
                                                   (structure, dtype, density, list(shape))] + [entry]
                            print(f"{structure} {dtype} {density} {shape}: crossover {entry['crossover_rows']} rows",
                                  flush=True)
                            RAW.write_text(json.dumps(raw, indent=1))
    write_outputs(raw)


if __name__ == "__main__":
    main()
