"""The GPU check: everything this project can only show on a GPU, in one command that runs on the lent
machine as it is (its own python3 and torch, no network, nothing installed), from a copy of the tree plus
one prepared folder that travels with it.

    python benchmarks/gpu_check.py --prepare          # here, once: .gpu-check/ (MiniLM in float16, the digits ViT)
    python3 benchmarks/gpu_check.py --out DIR         # there: every part below on CUDA, in about 7 minutes
    python benchmarks/gpu_check.py --dry-run --out DIR  # here: every part on the CPU, small, in under 10 minutes

Parts: (1) every `gpu`-marked test; (2) compress runs on CUDA with evaluation: sparsegpt-50, wanda-50,
sparsegpt-2-4, magnitude-50 with 100 finetune steps (bf16 autocast) and sparsegpt-90-condensed on MiniLM,
sparsegpt-50 on the digits ViT, and magnitude-50 on the digits ViT under torchrun (`--nproc 1`, NCCL);
(3) each output and its original loaded on CUDA (`compresscli.load(DIR, device="cuda")`): allocated GPU
memory against the file's bytes, latency at 1, 64 and 2048 tokens against the original; (4) the Triton
kernels (row-sparse, condensed, and quantized int8 per row / int4 g128 against their PyTorch dequantize +
cuBLAS) against cuBLAS at 4096 x 11008 (bf16) for batch 1-256, and the dispatch table those timings give
(`cuda_table.json`, kernels/cuda_paths.py's format). It writes gpu_check.md (the tables), gpu_check.json
(every figure) and cuda_table.json into DIR. A part that fails is recorded and the next one runs.

The dry run does the same on the CPU with small settings (the kernels in Triton's interpreter at a small
shape), so the script is known to work before a GPU is spent on it; its figures are CPU figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tree itself: nothing is installed on the lent machine
PREPARED = ROOT / ".gpu-check"
CARRY_LIMIT = 64 * 1024**2  # what travels to the lent machine: the tree and the carried folders
TOKENS = (1, 64, 2048)
DRY_TOKENS = (1, 64, 256)  # the dry run's: float16 MiniLM is slow on a CPU
KERNEL_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MINILM_RUNS = [("sparsegpt-50", []), ("wanda-50", []), ("sparsegpt-2-4", []), ("magnitude-50", ["1.steps=100"]),
               ("sparsegpt-90-condensed", [])]
VIT_RUNS = [("sparsegpt-50", [])]
NCCL_RUN = ("magnitude-50", ["1.steps=100"])

import torch  # noqa: E402  (after the path: compresscli comes from the tree)

# ----------------------------------------------------------------------------- prepare (here)


def prepare(folder: Path) -> dict[str, Any]:
    """MiniLM in float16 (the real pretrained one, cast) and the trained digits ViT, into `folder`."""
    from safetensors.torch import load_file, save_file

    from compresscli.io.references import reference_path

    folder.mkdir(parents=True, exist_ok=True)
    minilm, vit = folder / "minilm-fp16", folder / "digits-vit"
    for target in (minilm, vit):
        shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(reference_path("minilm"), minilm, ignore=shutil.ignore_patterns("*.safetensors", "*.bin",
                                                                                    "README.md", "onnx", "openvino"))
    tensors = load_file(str(reference_path("minilm") / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
              str(minilm / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((minilm / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float16"
    (minilm / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copytree(reference_path("digits-vit"), vit)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (minilm, vit)}
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    tree_bytes = sum((ROOT / f).stat().st_size for f in listed if f and (ROOT / f).is_file())
    total = tree_bytes + sum(sizes.values())
    summary = {"folder": str(folder), "bytes": sizes, "tree_bytes": tree_bytes, "total": total}
    if total > CARRY_LIMIT:
        raise SystemExit(f"the tree ({tree_bytes / 2**20:.1f} MiB) and {folder.name} ({sum(sizes.values()) / 2**20:.1f} "
                         f"MiB) exceed the {CARRY_LIMIT // 2**20} MiB that travel to the GPU machine")
    return summary


# ----------------------------------------------------------------------------- the parts


class Check:
    """The parts' results, timed, each failure recorded without stopping the next part."""

    def __init__(self, device: str, dry: bool, prepared: Path):
        self.device, self.dry, self.prepared = device, dry, prepared
        self.tokens = DRY_TOKENS if dry else TOKENS
        self.results: dict[str, Any] = {"parts": {}, "runs": [], "loads": [], "kernels": []}
        self.started = time.time()

    def part(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"\n== {name} ({time.time() - self.started:.0f} s so far)", flush=True)
        began = time.time()
        try:
            value = fn()
            status = "ok"
        except Exception as err:  # recorded, and the next part runs
            traceback.print_exc()
            value, status = None, f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        self.results["parts"][name] = {"status": status, "seconds": round(time.time() - began, 1)}
        print(f"-- {name}: {status} in {time.time() - began:.0f} s", flush=True)
        return value

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                "COMPRESSCLI_PREPARED_MODELS": str(self.prepared), "PYTHONUNBUFFERED": "1"}


def gpu_tests(check: Check) -> dict[str, Any]:
    """Every gpu-marked test (on the CPU they skip, which still shows they are collected and marked)."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if re.search(r"mark\.gpu|\bDEVICES\b", p.read_text()))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, env=check.env(), capture_output=True, text=True, timeout=240)
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", done.stdout)}
    if done.returncode not in (0, 5):
        raise RuntimeError(f"pytest exited {done.returncode}: {counts}")
    return {"files": files, **counts}


def _options(check: Check, data: str | None, **extra: Any):
    from compresscli.engine.options import RunOptions

    small = dict(calibration_examples=8, eval_examples=16, max_length=32, batch_size=8) if check.dry else \
        dict(calibration_examples=128, eval_examples=256, max_length=128, batch_size=16)
    return RunOptions(data=data, device=check.device, **{**small, **extra})


def _record_run(model: str, recipe: str, out: Path, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    execution, totals = report["execution"], report["memory"]["model"]
    metrics = {m["name"]: [m["original"], m["compressed"]] for m in (report.get("eval") or {}).get("metrics", [])}
    return {"model": model, "recipe": recipe, "out": str(out), "seconds": round(seconds, 1), "mode": execution["mode"],
            "world_size": execution.get("world_size"), "backend": execution.get("backend"),
            "gpu_peak_bytes": execution.get("gpu_peak_bytes"),
            "predicted_gpu_peak_bytes": execution.get("predicted_gpu_peak_bytes"),
            "peak_rss_bytes": execution["peak_rss_bytes"], "file_bytes": totals["file_bytes"],
            "dense_bytes": totals["dense_bytes"], "reload_max_abs_diff": report["reload"]["max_abs_diff"],
            "metrics": metrics}


def compress_runs(check: Check, work: Path) -> None:
    from compresscli.engine.recipe import load_recipe
    from compresscli.engine.run import compress_source
    from compresscli.io.source import open_source

    models = {"minilm-fp16": (MINILM_RUNS, "pydoc"), "digits-vit": (VIT_RUNS, "digits")}
    for model, (runs, data) in models.items():
        for recipe, sets in runs:
            if check.dry and any(s.endswith("steps=100") for s in sets):
                sets = [s.replace("steps=100", "steps=5") for s in sets]
            out = work / f"{model}-{recipe}"

            def one(model=model, recipe=recipe, sets=sets, data=data, out=out):
                began = time.time()
                result = compress_source(open_source(check.prepared / model), load_recipe(recipe, sets), out,
                                         _options(check, data), force=True)
                check.results["runs"].append(_record_run(model, recipe, out, result.report, time.time() - began))

            check.part(f"run {model} {recipe}", one)


def nccl_run(check: Check, work: Path) -> None:
    """The digits ViT recovered under torchrun, one process: NCCL on CUDA (gloo in the dry run)."""
    recipe, sets = NCCL_RUN
    sets = [s.replace("steps=100", "steps=5") for s in sets] if check.dry else sets
    out = work / "digits-vit-nproc1"
    small = ["--calibration-examples", "8", "--eval-examples", "16", "--batch-size", "8"] if check.dry else []
    command = [sys.executable, "-m", "compresscli", "run", str(check.prepared / "digits-vit"), "--recipe", recipe,
               *[a for s in sets for a in ("--set", s)], "--data", "digits", "--nproc", "1", "--device", check.device,
               "--out", str(out), "--force", *small]
    began = time.time()
    done = subprocess.run(command, cwd=ROOT, env=check.env(), capture_output=True, text=True, timeout=300)
    print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}")
    report = json.loads((out / "report.json").read_text())
    check.results["runs"].append(_record_run("digits-vit", f"{recipe} --nproc 1", out, report, time.time() - began))


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _tensor_bytes(model: torch.nn.Module) -> int:
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    seen.update({id(t): t for m in model.modules() for t in [getattr(m, "cached_weight", None)] if t is not None})
    return sum(t.numel() * t.element_size() for t in seen.values())


def load_and_time(check: Check) -> None:
    """Each output beside its original, loaded on the device: memory, and latency at 1 / 64 / 2048 tokens."""
    import compresscli
    from compresscli.commands.bench import measure_speed
    from compresscli.model.inputs import synthetic_batch

    device = torch.device(check.device)
    originals: dict[str, Any] = {}
    for run in list(check.results["runs"]):
        def one(run=run):
            model_name = run["model"]
            if model_name not in originals:
                originals[model_name] = _load_measured(check.prepared / model_name, device, compresscli)
            original, original_memory = originals[model_name]
            compressed, memory = _load_measured(Path(run["out"]), device, compresscli)
            task = _task_of(run["out"])
            per_image = 1 if task.modality == "text" else _tokens_per_image(original)

            def make_batch(tokens: int):
                if task.modality == "image":
                    return synthetic_batch(original, task, max(1, tokens // per_image))
                seq = min(tokens, 128)
                return synthetic_batch(original, task, max(1, tokens // seq), seq)

            speed = measure_speed(original, compressed, task, make_batch, batch_sizes=check.tokens, device=device,
                                  warmup=1 if check.dry else 5, repeats=3 if check.dry else 20)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                with torch.no_grad():
                    task.outputs(compressed, {k: v.to(device) for k, v in make_batch(2048).items()})
                memory["forward_peak_bytes_2048"] = torch.cuda.max_memory_allocated(device)
            check.results["loads"].append({
                "model": model_name, "recipe": run["recipe"], "file_bytes": run["file_bytes"],
                "original_file_bytes": run["dense_bytes"], **memory,
                "original_allocated_bytes": original_memory["allocated_bytes"],
                "original_tensor_bytes": original_memory["tensor_bytes"],
                "latency_ms": {str(r["batch"]): [r["original_ms"]["median"], r["compressed_ms"]["median"]]
                               for r in speed["batches"]},
                "kernels": speed["batches"][-1]["kernels"]})
            del compressed
        check.part(f"load {run['model']} {run['recipe']}", one)


def _task_of(path: str):
    from compresscli.io.source import open_source, skeleton_of
    from compresscli.model.tasks import task_for

    source = open_source(path)
    return task_for(source.model_kind, skeleton_of(source), source.pooling)


def _tokens_per_image(model: torch.nn.Module) -> int:
    return getattr(getattr(model, "patch_embed", None), "num_patches", 1) + 1


def _load_measured(path: Path, device: torch.device, compresscli) -> tuple[torch.nn.Module, dict[str, int]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = _allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    model = compresscli.load(path, device=device).eval()
    memory = {"tensor_bytes": _tensor_bytes(model)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        memory["allocated_bytes"] = _allocated(device) - before
        memory["load_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    else:
        memory["allocated_bytes"] = None
    return model, memory


def kernel_timings(check: Check) -> None:
    """On CUDA, here; in the dry run, in a fresh interpreter under TRITON_INTERPRET=1 at a small shape."""
    if check.dry:
        env = {**check.env(), "TRITON_INTERPRET": "1"}
        done = subprocess.run([sys.executable, str(Path(__file__)), "--kernels-only", "--device", "cpu",
                               "--shape", "96x64", "--batches", "1,16,64"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        print(done.stdout[-2000:], done.stderr[-3000:], sep="\n")
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}")
        check.results["kernels"] = json.loads(done.stdout.strip().splitlines()[-1])
        return
    check.results["kernels"] = time_kernels(torch.device("cuda"), (11008, 4096), KERNEL_BATCHES, torch.bfloat16)


def time_kernels(device: torch.device, shape: tuple[int, int], batches: tuple[int, ...],
                 dtype: torch.dtype) -> list[dict[str, Any]]:
    """Every path of every layout at `shape` (out, in), against cuBLAS on the dense weight: median ms."""
    import torch.nn.functional as F

    from compresscli.codecs.quant import grid, packing
    from compresscli.codecs.quant.grid import QuantSpec
    from compresscli.codecs.quant.values import QuantizedValues
    from compresscli.codecs.sparse.matrix import CompactSparse
    from compresscli.kernels import triton_kernels, triton_quantized, triton_sparse

    rows, cols = shape
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=g).to(dtype)
    layouts: dict[str, tuple[str, float, dict[str, Callable]]] = {}
    for fmt, density in (("bitmask", 0.5), ("bitmask", 0.25), ("csr", 0.05)):
        mask = torch.rand(rows, cols, generator=g) < density
        m = CompactSparse.from_masked(weight, mask, fmt).to(device)
        csr = torch.sparse_csr_tensor(torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)]),
                                      mask.nonzero()[:, 1], weight[mask], (rows, cols)).to(device)
        paths = {"triton_gemv": lambda x, m=m: triton_sparse.row_sparse_mm(x, m.values, m.cols, m.row_ptr, None,
                                                                             rows, cols),
                 "triton_decode": lambda x, m=m: F.linear(x, triton_sparse.row_sparse_dense(m.values, m.cols,
                                                                                              m.row_ptr, rows, cols)),
                 "cusparse": lambda x, csr=csr: torch.sparse.mm(csr, x.t()).t()}
        layouts[f"{fmt} {density:g}"] = ("row_sparse", density, paths)
    for density in (0.1, 0.5):
        k = max(1, round(density * cols))
        idx = torch.rand(rows, cols, generator=g).topk(k, dim=1).indices.sort(1).values.to(torch.int16).to(device)
        values = torch.randn(rows, k, generator=g).to(dtype).to(device)
        paths = {"triton_gemv": lambda x, v=values, i=idx: triton_kernels.condensed_mm(x, v, i, None, False),
                 "triton_tiled": lambda x, v=values, i=idx: triton_kernels.condensed_mm(x, v, i, None, True),
                 "triton_decode": lambda x, v=values, i=idx, k=k: F.linear(
                     x, triton_sparse.row_sparse_dense(v, i, None, rows, cols, k))}
        layouts[f"condensed {density:g}"] = ("condensed", density, paths)
    for bits, group_size in ((8, None), (4, 128)):  # quantized dense weights: both kernels, and the PyTorch
        spec = QuantSpec(bits, group_size and min(group_size, cols))  # dequantize + cuBLAS they replace
        codes, scales, _ = grid.rtn(weight.float(), spec, dtype)
        q = QuantizedValues(spec, packing.pack(codes, bits), scales, None, (rows, cols), cols).to(device)
        paths = {path: lambda x, q=q, tiled=path == "triton_tiled": triton_quantized.quantized_mm(
                     x, q.codes, q.scales, None, q.spec.bits, q.spec.group(cols), None, tiled)
                 for path in ("triton_gemv", "triton_tiled")}
        paths["dense"] = lambda x, q=q: F.linear(x, q.dequantize(x.dtype))
        layouts[f"int{bits} {f'g{spec.group_size}' if group_size else 'per row'}"] = ("quantized", 1.0, paths)
    dense = weight.to(device)
    timings = []
    for n in batches:
        x = torch.randn(n, cols, generator=g).to(dtype).to(device)
        cublas = _median_ms(lambda: F.linear(x, dense), device)
        for name, (layout, density, paths) in layouts.items():
            for path, fn in paths.items():
                timings.append({"layout": layout, "structure": name, "density": density, "batch": n, "path": path,
                                "ms": _median_ms(lambda: fn(x), device), "cublas_ms": cublas})
    return timings


def _median_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 15) -> float:
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def measured_table(timings: list[dict[str, Any]], device_name: str) -> dict[str, Any]:
    """kernels/cuda_paths.py's table from the timings: for each structure measured (densest first) and each
    Triton product, the largest batch up to which it beat decode + cuBLAS at every batch measured."""
    from compresscli.kernels.cuda_paths import check_table

    table: dict[str, Any] = {"measured_on": device_name}
    for layout in ("row_sparse", "condensed"):
        rows = []
        mine = [t for t in timings if t["layout"] == layout]
        decode = {(t["density"], t["batch"]): t["ms"] for t in mine if t["path"] == "triton_decode"}
        for density in sorted({t["density"] for t in mine}, reverse=True):
            for path in ("triton_gemv", "triton_tiled"):
                last_win = None
                for t in sorted((t for t in mine if t["density"] == density and t["path"] == path),
                                key=lambda t: t["batch"]):
                    if t["ms"] >= decode[(density, t["batch"])]:
                        break
                    last_win = t["batch"]
                if last_win is not None:
                    rows.append([last_win, density, path])
        table[layout] = sorted(rows, key=lambda r: (-r[1], r[0])) + [[None, 1.0, "triton_decode"]]
    table["quantized"] = quantized_rows([t for t in timings if t["layout"] == "quantized"])
    return check_table(table, "measured")


def quantized_rows(timings: list[dict[str, Any]]) -> list[list[Any]]:
    """The quantized layout's rows: at each batch, the path (triton_gemv, triton_tiled or dense) with the least
    time summed over the quantized structures measured, runs of one path merged, the last row open; the
    design rows when none was measured."""
    from compresscli.kernels.cuda_paths import DESIGN_TABLE

    total: dict[tuple[int, str], float] = {}
    for t in timings:
        total[(t["batch"], t["path"])] = total.get((t["batch"], t["path"]), 0.0) + t["ms"]
    rows: list[list[Any]] = []
    for batch in sorted({b for b, _ in total}):
        best = min((p for b, p in total if b == batch), key=lambda p: total[(batch, p)])
        if rows and rows[-1][2] == best:
            rows[-1][0] = batch
        else:
            rows.append([batch, 1.0, best])
    if not rows:
        return DESIGN_TABLE["quantized"]
    rows[-1][0] = None
    return rows


# ----------------------------------------------------------------------------- report


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    unit = "GPU" if not meta["dry_run"] else "none (dry run: CPU figures)"
    lines = [f"# GPU check, {meta['date']}", "", f"{meta['device_name']}; torch {meta['torch']} (CUDA {meta['cuda']}); "
             f"python {meta['python']}; {meta['seconds']:.0f} s in all{'; DRY RUN on the CPU' if meta['dry_run'] else ''}",
             "", f"    {meta['command']}", "", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {p['status']} | {p['seconds']:.0f} |" for name, p in results["parts"].items()]
    tests = results.get("tests") or {}
    lines += ["", f"gpu tests: {', '.join(f'{v} {k}' for k, v in tests.items() if k != 'files') or '-'}", "",
              "## Runs", "", "| model | recipe | mode | s | GPU peak MiB (predicted) | file MiB / dense | reload diff | "
              "metrics (original -> compressed) |", "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        metrics = "; ".join(f"{k} {_num(o)} -> {_num(c)}" for k, (o, c) in r["metrics"].items())
        lines.append(f"| {r['model']} | {r['recipe']} | {r['mode']} ({r['world_size']} x {r['backend'] or 'no group'}) | "
                     f"{r['seconds']:.0f} | {_mib(r['gpu_peak_bytes'])} ({_mib(r['predicted_gpu_peak_bytes'])}) | "
                     f"{_mib(r['file_bytes'])} / {_mib(r['dense_bytes'])} | {r['reload_max_abs_diff']:.3g} | {metrics} |")
    lines += ["", f"## Loaded on the device ({unit} memory)", "",
              "| model | recipe | file MiB | allocated MiB (original) | tensor MiB (original) | ms at N tokens, "
              "original -> compressed | kernels |", "|---|---|---|---|---|---|---|"]
    for r in results["loads"]:
        lat = "; ".join(f"{n}: {o:.2f} -> {c:.2f}" for n, (o, c) in r["latency_ms"].items())
        lines.append(f"| {r['model']} | {r['recipe']} | {_mib(r['file_bytes'])} | {_mib(r['allocated_bytes'])} "
                     f"({_mib(r['original_allocated_bytes'])}) | {_mib(r['tensor_bytes'])} ({_mib(r['original_tensor_bytes'])})"
                     f" | {lat} | {', '.join(f'{k} {v}' for k, v in r['kernels'].items())} |")
    kernels = results["kernels"] or []
    if kernels:
        structures = list(dict.fromkeys(f"{t['structure']} {t['path']}" for t in kernels))
        batches = sorted({t["batch"] for t in kernels})
        lines += ["", f"## Kernels at {meta['kernel_shape']} ({meta['kernel_dtype']}), ms (median); cuBLAS on the "
                  "dense weight first", "", "| path | " + " | ".join(map(str, batches)) + " |",
                  "|---|" + "---|" * len(batches)]
        cublas = {t["batch"]: t["cublas_ms"] for t in kernels}
        lines.append("| cuBLAS dense | " + " | ".join(f"{cublas[b]:.4f}" for b in batches) + " |")
        for s in structures:
            row = {t["batch"]: t["ms"] for t in kernels if f"{t['structure']} {t['path']}" == s}
            lines.append(f"| {s} | " + " | ".join(f"{row[b]:.4f}" if b in row else "-" for b in batches) + " |")
    if results.get("cuda_table"):
        lines += ["", "Dispatch table these timings give (cuda_table.json; kernels/cuda_paths.py's format):", "",
                  f"    {json.dumps(results['cuda_table'])}"]
    return "\n".join(lines) + "\n"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="write the models the check reads into --models")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU, small (no GPU needed)")
    parser.add_argument("--out", type=Path, help="results folder (gpu_check.md, gpu_check.json, cuda_table.json)")
    parser.add_argument("--models", type=Path, default=PREPARED, help="the prepared folder (default: .gpu-check)")
    parser.add_argument("--kernels-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="11008x4096", help=argparse.SUPPRESS)
    parser.add_argument("--batches", default=",".join(map(str, KERNEL_BATCHES)), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        print(json.dumps(prepare(args.models), indent=2))
        return 0
    if args.kernels_only:  # the dry run's kernel part, in a fresh interpreter (TRITON_INTERPRET is read at import)
        shape = tuple(int(s) for s in args.shape.split("x"))
        timings = time_kernels(torch.device(args.device), shape, tuple(int(b) for b in args.batches.split(",")),
                               torch.float32)
        print(json.dumps(timings))
        return 0
    if args.out is None:
        parser.error("--out DIR is required (where the results are written)")
    if not (args.models / "minilm-fp16" / "model.safetensors").is_file():
        parser.error(f"{args.models} is not prepared: run `python benchmarks/gpu_check.py --prepare` first")
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        parser.error("no CUDA device here: pass --dry-run to run every part on the CPU")
    os.environ.setdefault("COMPRESSCLI_CACHE", tempfile.mkdtemp(prefix="compresscli-cache-"))
    check = Check("cuda" if not args.dry_run else "cpu", args.dry_run, args.models.resolve())
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"device {torch.cuda.get_device_name(0) if cuda else 'cpu'}; outputs under {work}", flush=True)
    try:
        check.results["tests"] = check.part("gpu tests", lambda: gpu_tests(check))
        compress_runs(check, work)
        check.part("run digits-vit magnitude-50 --nproc 1", lambda: nccl_run(check, work))
        load_and_time(check)
        check.part("kernels", lambda: kernel_timings(check))
        device_name = torch.cuda.get_device_name(0) if cuda and not args.dry_run else "cpu (dry run)"
        if check.results["kernels"]:
            check.results["cuda_table"] = check.part("table", lambda: measured_table(check.results["kernels"],
                                                                                     device_name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    check.results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run, "device_name": device_name,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "seconds": time.time() - check.started, "command": "python " + " ".join(sys.argv),
        "kernel_shape": "96x64" if args.dry_run else "11008x4096", "kernel_dtype": "float32" if args.dry_run else "bfloat16"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(check.results, indent=2, default=str))
    (args.out / "gpu_check.md").write_text(render(check.results))
    if check.results.get("cuda_table"):
        (args.out / "cuda_table.json").write_text(json.dumps(check.results["cuda_table"], indent=2))
    print(render(check.results))
    return 0 if all(p["status"] == "ok" for p in check.results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
