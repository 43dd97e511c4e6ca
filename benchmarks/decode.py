"""Decoding at the bytes limit: every compressed form against dense, per layer and per model (issue 22).

    layers  per-layer kernel tables at the Llama MLP shapes (2048x5632, 5632x2048, 4096x11008) in float32 and
            bfloat16: each form's product at 1 and 8 input rows and a 512-row prefill against F.linear on the
            dense weight, with the bytes it reads and its share of the bytes limit. Layers are timed round
            robin over enough copies to exceed the last-level cache (what a model's decode sees).
    model   `compress run SOURCE --recipe R --out OUT --no-eval` for each form (once; outputs are reused), then
            `compress bench OUT --decode --baseline SOURCE --json` (a fresh process per model).
    report  benchmarks/results/decode.md from the raw JSON under benchmarks/results/decode/.

    flock /tmp/timing.lock python benchmarks/decode.py layers --dtypes bfloat16
    python benchmarks/decode.py model --source /work/scratch/llama-1b --tag 1b --sequential \
        --forms magnitude-50,condensed-90,fips-40 --work /work/scratch/decode/outs   # the lock taken per step
    python benchmarks/decode.py model --source 7B_DIR --tag 7b ...   # 7B_DIR: benchmarks/scale.py --models 7b --generate-only trained
    python benchmarks/decode.py report
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.autograd.graph import increment_version

ROOT = Path(__file__).resolve().parent
RAW = ROOT / "results" / "decode"
REPORT = ROOT / "results" / "decode.md"
LOCK = "/tmp/timing.lock"
RECIPES = {  # form -> (description, stages); the MLPs only, as the targets
    "magnitude-50": ("Per-layer magnitude pruning of the MLPs to 50% (bitmask).",
                     "  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5, scope: layer}\n"),
    "condensed-90": ("Condensed 90% (constant fan-in) on the MLPs.",
                     "  - method: condensed\n    targets: [mlp]\n    params: {sparsity: 0.9}\n"),
    "fips-40": ("FiPS at 40% of the MLP weights, SVD initialisation and masks only (steps 0: the bytes and "
                "the kernels are those of a trained one).",
                "  - method: fips\n    targets: [mlp]\n    params: {budget: 0.4, steps: 0}\n"),
    "rps-10": ("RPS 10x on the MLPs, one memory per block.",
               "  - method: rps\n    targets: [mlp]\n    params: {compression: 10, scope: block}\n"),
    "magnitude-50-int8": ("Per-layer magnitude pruning of the MLPs to 50% (bitmask), then the kept values int8 per "
                          "output row (round to nearest): the int8 row-sparse kernel.",
                          "  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5, scope: layer}\n"
                          "  - method: quantize\n    targets: [mlp]\n"
                          "    params: {bits: 8, group_size: null, solver: rtn}\n"),
    "int8-mlp": ("int8 per output row (round to nearest) on the MLPs (torch's int8 weight-only kernel).",
                 "  - method: quantize\n    targets: [mlp]\n    params: {bits: 8, group_size: null, solver: rtn}\n"),
    "int4-mlp": ("int4 in groups of 128 (round to nearest) on the MLPs (torch's int4 weight-only kernel).",
                 "  - method: quantize\n    targets: [mlp]\n    params: {bits: 4, group_size: 128, solver: rtn}\n"),
    "int4-all": ("int4 in groups of 128 (round to nearest) on every Linear: MLPs, attention and the LM head.",
                 "  - method: quantize\n    targets: [mlp, attention, head]\n"
                 "    params: {bits: 4, group_size: 128, solver: rtn}\n"),
}
LAYER_SHAPES = [(5632, 2048), (2048, 5632), (11008, 4096)]  # (out, in): gate/up, down of the 1B; up of the 7B


# ----------------------------------------------------------------------------- layers

def _compressed_layer(form: str, out_features: int, in_features: int, dtype: torch.dtype) -> nn.Module:
    """One inference-form layer of `form` made from a dense Linear at the trained weight scale."""
    from compresscli import CondensedConfig, MagnitudeConfig, RPSConfig, compress_
    from compresscli.codecs.fips.training import FipsLinear
    from compresscli.codecs.forms import to_inference_
    from compresscli.methods.fips_init import fips_rank

    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(dense.weight, std=in_features ** -0.5)
    holder = nn.Sequential(dense.to(dtype))
    if form == "dense":
        return holder[0]
    if form == "fips-40":  # a layer of a 4-block group of Llama MLPs (12 matrices share U); V at 25%
        width, hidden = min(in_features, out_features), max(in_features, out_features)
        rank = fips_rank(width, 12 * hidden, 0.4, 0.75)
        base = nn.Parameter((torch.randn(width, rank) * width ** -0.5).to(dtype))
        orientation = "in" if out_features == hidden else "out"
        holder[0] = FipsLinear(base, (torch.randn(rank, hidden) * rank ** -0.5).to(dtype),
                               torch.rand(rank, hidden) < 0.25, None, orientation, "fips.0", True)
    else:
        config = {"magnitude-50": MagnitudeConfig(sparsity=0.5, scope="layer"),
                  "condensed-90": CondensedConfig(sparsity=0.9),
                  "rps-10": RPSConfig(compression=10)}[form]
        compress_(holder, config, None)
    return to_inference_(holder)[0]


def _time_round_robin(layers: list[Callable[[torch.Tensor], object]], x: torch.Tensor, sweeps: int,
                      budget_s: float | None = None) -> float:
    """Median seconds per layer call over `sweeps` passes, each calling every copy once (fewer passes, at least 3,
    where they would take more than `budget_s`). x gets a new version before every call, so that no layer reuses
    a product it cached for x (FiPS's projection onto U)."""
    times = []
    with torch.no_grad():
        start = time.perf_counter()
        for layer in layers:
            layer(x)
        if budget_s is not None:
            sweeps = min(sweeps, max(3, int(budget_s / (time.perf_counter() - start))))
        for _ in range(sweeps):
            start = time.perf_counter()
            for layer in layers:
                increment_version(x)
                layer(x)
            times.append((time.perf_counter() - start) / len(layers))
    return statistics.median(times)


def measure_layers(dtypes: list[str], forms: list[str], threads: int, cache_bytes: float, save) -> list[dict]:
    """Every form at every shape and dtype; `save(entry)` is called after each (so a run cut short keeps its rows)."""
    from compresscli.commands.decode import ReadCounter, read_bandwidth, tensor_bytes

    torch.set_num_threads(threads)
    bandwidth = read_bandwidth(threads)
    rows = []
    for out_features, in_features in LAYER_SHAPES:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for form in forms:
                layer = _compressed_layer(form, out_features, in_features, dtype)
                copies = max(2, int(cache_bytes // max(1, tensor_bytes(layer))) + 1)
                layers = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
                entry = {"shape": [out_features, in_features], "dtype": dtype_name, "form": form, "copies": copies,
                         "resident_bytes": tensor_bytes(layer), "bandwidth": bandwidth}
                for n in (1, 8, 512):
                    x = torch.randn(n, in_features).to(dtype)
                    counter = ReadCounter(layer)
                    with torch.no_grad():
                        layer(x)
                    counter.remove()
                    sweeps = 15 if n <= 8 else 3
                    entry[f"rows_{n}"] = {"us": _time_round_robin(layers if n <= 8 else layers[:2], x, sweeps) * 1e6,
                                          "bytes_read": counter.bytes, "path": getattr(layer, "last_path", "dense")}
                rows.append(entry)
                save(entry)
                print(json.dumps({k: v for k, v in entry.items() if k != "bandwidth"}), flush=True)
                del layers, layer
    return rows


# ----------------------------------------------------------------------------- models

def compress_once(source: Path, form: str, work: Path, sequential: bool) -> Path:
    out = work / f"{source.name}-{form}"
    if (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file():
        return out
    description, stages = RECIPES[form]
    recipe = work / f"{form}.yaml"
    recipe.write_text(f"description: {json.dumps(description)}\nstages:\n{stages}")
    command = [sys.executable, "-m", "compresscli", "run", str(source), "--recipe", str(recipe), "--out", str(out),
               "--no-eval", "--calibration-examples", "8", "--max-length", "64"]
    command += ["--sequential"] if sequential else []
    print("$ flock", LOCK, " ".join(command), flush=True)
    done = subprocess.run(["flock", LOCK, *command], capture_output=True, text=True)
    (work / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"compress run failed for {form}: {done.stderr.strip()[-800:]}")
    return out


def measure_model(source: Path, forms: list[str], work: Path, sequential: bool, threads: int, steps: int,
                  tag: str) -> None:
    RAW.mkdir(parents=True, exist_ok=True)
    for form in forms:
        out = compress_once(source, form, work, sequential)
        command = [sys.executable, "-m", "compresscli", "bench", str(out), "--decode", "--baseline", str(source),
                   "--threads", str(threads), "--steps", str(steps), "--json"]
        print("$ flock", LOCK, " ".join(command), flush=True)
        done = subprocess.run(["flock", LOCK, *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench failed for {form}: {done.stderr.strip()[-800:]}")
        result = {**json.loads(done.stdout), "tag": tag, "form": form, "recipe": RECIPES[form][0],
                  "command": " ".join(command[1:])}
        (RAW / f"model-{tag}-{form}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result["speedup"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    layers = sub.add_parser("layers")
    layers.add_argument("--dtypes", default="float32,bfloat16")
    layers.add_argument("--forms", default="dense,magnitude-50,condensed-90,fips-40,rps-10")
    layers.add_argument("--threads", type=int, default=2)
    layers.add_argument("--cache-bytes", type=float, default=1.0e9, help="bytes of copies timed round robin")
    model = sub.add_parser("model")
    model.add_argument("--source", type=Path, required=True)
    model.add_argument("--tag", required=True, help="name of the model in the results, e.g. 1b")
    model.add_argument("--forms", default="magnitude-50,condensed-90,fips-40")
    model.add_argument("--work", type=Path, required=True, help="where the compressed outputs go (not committed)")
    model.add_argument("--sequential", action="store_true", help="compress block by block")
    model.add_argument("--threads", type=int, default=2)
    model.add_argument("--steps", type=int, default=16)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.what == "layers":
        RAW.mkdir(parents=True, exist_ok=True)
        path = RAW / "layers.json"
        rows = json.loads(path.read_text()) if path.is_file() else []

        def save(entry: dict) -> None:
            key = (entry["shape"][0], entry["shape"][1], entry["dtype"], entry["form"])
            rows[:] = [r for r in rows if (r["shape"][0], r["shape"][1], r["dtype"], r["form"]) != key] + [entry]
            path.write_text(json.dumps(rows, indent=1))

        measure_layers(args.dtypes.split(","), args.forms.split(","), args.threads, args.cache_bytes, save)
    elif args.what == "model":
        args.work.mkdir(parents=True, exist_ok=True)
        measure_model(args.source, args.forms.split(","), args.work, args.sequential, args.threads, args.steps,
                      args.tag)
    else:
        from decode_report import write_report

        write_report(RAW, REPORT)


if __name__ == "__main__":
    main()
