"""End-to-end latency of an original model against its compressed version: same inputs, same device.

`measure_speed` times whole forward passes at each batch size after a warm-up, alternating the two
models repeat by repeat (so a noisy neighbour slows both alike), and reports medians with the 10th-90th
percentile spread, the speed-up, and which condensed kernel ran in each layer (modules that record a
`last_path`, see compresscli.kernels). `measure_memory` reads, in a fresh process per checkpoint, the
resident bytes loading adds and the peak a forward reaches above them. Everything returned is JSON-able.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compresscli.io.checkpoint import Checkpoint, recorded_original
from compresscli.model.inputs import synthetic_batch
from compresscli.model.tasks import Batch, Task
log = logging.getLogger(__name__)


def layer_paths(model: nn.Module) -> dict[str, str]:
    """Layer name -> the product its last forward ran (compressed layers record it; see compresscli.kernels)."""
    return {name: m.last_path for name, m in model.named_modules() if getattr(m, "last_path", None)}


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """How many layers ran each path in the last forward."""
    return dict(Counter(layer_paths(model).values()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spread(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median": statistics.median(ordered) * 1e3, "p10": pick(0.1) * 1e3, "p90": pick(0.9) * 1e3}


@torch.no_grad()
def _time_pair(models: dict[str, nn.Module], task: Task, batch: Batch, device: torch.device, warmup: int,
               repeats: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    for model in models.values():
        for _ in range(warmup):
            task.outputs(model, batch)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = clock()
            task.outputs(model, batch)
            _sync(device)
            times[name].append(clock() - start)
    return times


def measure_speed(original: nn.Module, compressed: nn.Module, task: Task,
                  make_batch: Callable[[int], Batch] | None = None, *, batch_sizes: tuple[int, ...] = (1, 32),
                  device: str | torch.device = "cpu", warmup: int = 3, repeats: int = 20, threads: int | None = None,
                  seq_len: int = 16, input_size: tuple[int, int, int] | None = None,
                  clock: str = "wall") -> dict[str, Any]:
    """Median latency (ms) of both models per batch size, the speed-up, and the kernels that ran.

    `make_batch(n)` gives the inputs for batch size n (default: `synthetic_batch` with `seq_len` tokens
    per sequence for text, `input_size` images). `threads` sets torch's CPU threads for the measurement
    and restores them after. `clock="thread"` times this thread's CPU time instead of the wall clock: on a
    machine shared with busy processes it leaves out the time slices they take, but it sees one thread
    only, so it needs threads=1 on the CPU.
    """
    device = torch.device(device)
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    if clock == "thread" and (threads != 1 or device.type != "cpu"):
        raise ValueError("clock='thread' measures one thread's CPU time: use it with threads=1 on the CPU")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    if make_batch is None:
        inputs = "synthetic images" if task.modality == "image" else f"synthetic token ids, {seq_len} per sequence"
        make_batch = lambda n: synthetic_batch(original, task, n, seq_len, input_size)  # noqa: E731
    else:
        inputs = "given by make_batch"
    models = {"original": original.eval().to(device), "compressed": compressed.eval().to(device)}
    load_before = load_average()
    rows = []
    try:
        for n in batch_sizes:
            batch = {k: v.to(device) for k, v in make_batch(n).items()}
            times = _time_pair(models, task, batch, device, warmup, repeats,
                               time.thread_time if clock == "thread" else time.perf_counter)
            stats = {name: _spread(t) for name, t in times.items()}
            rows.append({"batch": n, "original_ms": stats["original"], "compressed_ms": stats["compressed"],
                         "speedup": stats["original"]["median"] / stats["compressed"]["median"],
                         "kernels": kernel_counts(compressed), "layer_paths": layer_paths(compressed)})
    finally:
        torch.set_num_threads(previous_threads)
    return {"device": str(device), "device_name": device_name(device),
            "threads": (threads or previous_threads) if device.type == "cpu" else None,
            "torch": torch.__version__, "warmup": warmup, "repeats": repeats, "inputs": inputs,
            "clock": "thread CPU time" if clock == "thread" else ("CUDA-synchronised wall clock"
                                                                 if device.type == "cuda" else "wall clock"),
            "load_average": {"before": load_before, "after": load_average()}, "batches": rows}


def compare_checkpoints(compressed: Checkpoint, original: Checkpoint | None = None, *, memory: bool = True,
                        **options: Any) -> dict[str, Any]:
    """`measure_speed` for two loaded checkpoints; the original defaults to the source recorded in a
    compresscli output directory. `options` are measure_speed's keyword arguments. With `memory`, each
    checkpoint's `measure_memory` at the smallest batch size is added under "memory"."""
    original = original or recorded_original(compressed)
    task = compressed.task()
    result = measure_speed(original.model, compressed.model, task, **options)
    result = {"checkpoint": compressed.name, "baseline": original.name, **result}
    if memory:
        threads = options.get("threads")
        size = dict(batch_size=min(options.get("batch_sizes", (1, 32))), seq_len=options.get("seq_len", 16),
                    input_size=options.get("input_size"), threads=threads or result["threads"])
        result["memory"] = {"device": "cpu", "batch": size["batch_size"],
                            **{name: {"file_bytes": ckpt.file_bytes, **measure_memory(ckpt, **size)}
                               for name, ckpt in (("original", original), ("compressed", compressed))}}
    return result


# ----------------------------------------------------------------------------- memory

_NOT_MEASURED = {"load_bytes": None, "forward_peak_bytes": None}


def _spec_of(ckpt: Checkpoint) -> tuple[str, str | None]:
    """The (spec, weights) that `load_checkpoint` reads `ckpt` from again: a `timm:ARCH --weights FILE`
    source is named by its architecture alone, its file kept in the index."""
    source = ckpt.source
    if source is not None and source.kind == "timm" and source.directory is None:
        return f"timm:{source.name}", str(source.index.files[0])
    return ckpt.name, None


def measure_memory(ckpt: Checkpoint, batch_size: int = 1, seq_len: int = 16,
                   input_size: tuple[int, int, int] | None = None, threads: int | None = None,
                   timeout: float = 600) -> dict[str, Any]:
    """Resident bytes that loading `ckpt` adds, and the peak a forward on `synthetic_batch` reaches above
    the loaded model, read on the CPU in a fresh Python process (this one holds both models already,
    and its allocator's history would blur the readings). Both are None, with the reason in "note",
    where they cannot be read."""
    if not os.path.exists("/proc/self/status"):
        return {**_NOT_MEASURED, "note": "not measured (no /proc)"}
    spec, weights = _spec_of(ckpt)
    args = json.dumps([spec, weights, batch_size, seq_len, list(input_size) if input_size else None, threads])
    code = ("import json, sys; from compresscli.commands.bench import _memory_here; "
            "print('MEMORY ' + json.dumps(_memory_here(*json.loads(sys.argv[1]))))")
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=timeout,
                              env=env)
        line = [x for x in done.stdout.splitlines() if x.startswith("MEMORY ")]
        if done.returncode != 0 or not line:
            raise RuntimeError((done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1])
        return json.loads(line[-1][len("MEMORY "):])
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as err:
        log.warning("memory of %s not measured: %s", spec, err)
        return {**_NOT_MEASURED, "note": f"not measured ({err})"}


def _memory_here(spec: str, weights: str | None, batch_size: int, seq_len: int,
                 input_size: list[int] | None, threads: int | None) -> dict[str, Any]:
    """`measure_memory`'s readings, in the process that runs this (the one it starts).

    Loading imports hundreds of modules lazily (tens of MB) and the first forward starts thread pools
    and compiled kernels, so the checkpoint is loaded and run once, and released, before the readings;
    every free heap page is then returned to the system, so the second load cannot reuse the first's.
    Every parameter and buffer is read once after loading: weights a loader memory-maps count as
    resident only once touched."""
    from compresscli.io.checkpoint import load_checkpoint
    from compresscli.core.resources import PeakMemory, current_rss, release_free_heap, return_freed_memory_promptly

    return_freed_memory_promptly()
    if threads:
        torch.set_num_threads(threads)

    def load() -> Checkpoint:
        ckpt = load_checkpoint(spec, weights)
        for tensor in ckpt.model.state_dict(keep_vars=True).values():
            tensor.detach().sum()  # noqa: B018 - reads every page
        return ckpt

    def forward(ckpt: Checkpoint, batch: Batch) -> None:
        with torch.no_grad():
            ckpt.task().outputs(ckpt.model, batch)

    ckpt = load()
    shape = dict(seq_len=seq_len, input_size=tuple(input_size) if input_size else None)
    batch = synthetic_batch(ckpt.model, ckpt.task(), batch_size, **shape)
    forward(ckpt, batch)
    del ckpt
    gc.collect()
    release_free_heap()
    before = current_rss()
    ckpt = load()
    gc.collect()
    loaded = current_rss()
    peak = PeakMemory()
    forward(ckpt, batch)
    top = peak.peak()
    if not peak.since_start:
        return {"load_bytes": loaded - before, "forward_peak_bytes": None,
                "note": "forward peak not measured (the kernel does not let VmHWM be reset)"}
    return {"load_bytes": loaded - before, "forward_peak_bytes": max(0, top - loaded)}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where /proc is absent): timings on a shared machine
    mean little without them."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and its logical core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        return f"{names[0]}, {len(names)} cores" if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def render_markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table, for the CLI and the benchmarks."""
    lines = [f"{result['checkpoint']} against {result['baseline']}", ""] if "checkpoint" in result else []
    lines += [f"Latency on {result['device']} ({result['device_name']}"
             + (f", {result['threads']} threads" if result["threads"] else "")
             + f"), {result.get('clock', 'wall clock')}, median of {result['repeats']} after {result['warmup']} "
             f"warm-up; {result['inputs']}"
             + _load_note(result.get("load_average")), "",
             "| batch | original ms (p10-p90) | compressed ms (p10-p90) | speed-up | kernels |", "|---|---|---|---|---|"]
    for row in result["batches"]:
        o, c = row["original_ms"], row["compressed_ms"]
        kernels = ", ".join(f"{k} x{v}" for k, v in sorted(row["kernels"].items())) or "-"
        lines.append(f"| {row['batch']} | {o['median']:.3f} ({o['p10']:.3f}-{o['p90']:.3f}) | "
                     f"{c['median']:.3f} ({c['p10']:.3f}-{c['p90']:.3f}) | {row['speedup']:.2f}x | {kernels} |")
    if result.get("memory"):
        lines += ["", *_memory_lines(result["memory"])]
    return "\n".join(lines)


def _memory_lines(memory: dict[str, Any]) -> list[str]:
    megabytes = lambda b: "-" if b is None else f"{b / 1e6:.1f}"  # noqa: E731
    lines = [f"Memory on the {memory['device']}, a fresh process per model with its libraries imported first; "
             f"forward at batch {memory['batch']}", "",
             "| model | file MB | resident MB added by loading | peak MB during the forward |", "|---|---|---|---|"]
    notes = []
    for name in ("original", "compressed"):
        m = memory[name]
        lines.append(f"| {name} | {megabytes(m['file_bytes'])} | {megabytes(m['load_bytes'])} | "
                     f"{megabytes(m['forward_peak_bytes'])} |")
        notes += [f"{name}: {m['note']}"] if m.get("note") else []
    return lines + ([""] + notes if notes else [])


def _load_note(load: dict[str, Any] | None) -> str:
    if not load or load.get("before") is None:
        return ""
    show = lambda v: " ".join(f"{x:.2f}" for x in v) if v else "?"  # noqa: E731
    return f"; load average before {show(load['before'])}, after {show(load['after'])}"
