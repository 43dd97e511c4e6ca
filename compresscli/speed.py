"""End-to-end latency of an original model against its compressed version: same inputs, same device.

`measure_speed` times whole forward passes at each batch size after a warm-up, alternating the two
models repeat by repeat (so a noisy neighbour slows both alike), and reports medians with the 10th-90th
percentile spread, the speed-up, and which condensed kernel ran in each layer (modules that record a
`last_path`, see compresscli.kernels). Everything returned is JSON-able.
"""
from __future__ import annotations

import platform
import statistics
import time
from collections import Counter
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import Checkpoint, recorded_original
from .tasks import Task

Batch = dict[str, torch.Tensor]


def image_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model reads. timm models built with img_size/in_chans arguments keep their
    architecture's default pretrained_cfg, so the patch embedding is asked first."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    proj = getattr(embed, "proj", None)
    if size is not None and isinstance(proj, nn.Conv2d):
        return (proj.in_channels, *tuple(size))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    config = getattr(model, "config", None)
    side = getattr(config, "image_size", 224)
    return (getattr(config, "num_channels", 3), side, side)


def synthetic_batch(model: nn.Module, task: Task, batch_size: int, seq_len: int = 16,
                    input_size: tuple[int, int, int] | None = None, seed: int = 0) -> Batch:
    """Inputs shaped as the model reads them: random pixels of `input_size` (C, H, W; default:
    `image_input_size(model)`), or `seq_len` random token ids per sequence."""
    generator = torch.Generator().manual_seed(seed)
    if task.modality == "image":
        size = tuple(input_size) if input_size is not None else image_input_size(model)
        return {"pixel_values": torch.randn(batch_size, *size, generator=generator)}
    vocab = getattr(getattr(model, "config", None), "vocab_size", 1000)
    ids = torch.randint(min(999, vocab - 1), vocab, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """How many layers ran each condensed path in the last forward."""
    return dict(Counter(m.last_path for m in model.modules() if getattr(m, "last_path", None)))


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
                         "kernels": kernel_counts(compressed)})
    finally:
        torch.set_num_threads(previous_threads)
    return {"device": str(device), "device_name": device_name(device),
            "threads": (threads or previous_threads) if device.type == "cpu" else None,
            "torch": torch.__version__, "warmup": warmup, "repeats": repeats, "inputs": inputs,
            "clock": "thread CPU time" if clock == "thread" else ("CUDA-synchronised wall clock"
                                                                 if device.type == "cuda" else "wall clock"),
            "load_average": {"before": load_before, "after": load_average()}, "batches": rows}


def compare_checkpoints(compressed: Checkpoint, original: Checkpoint | None = None, **options: Any) -> dict[str, Any]:
    """`measure_speed` for two loaded checkpoints; the original defaults to the source recorded in a
    compresscli output directory. `options` are measure_speed's keyword arguments."""
    original = original or recorded_original(compressed)
    task = compressed.task()
    result = measure_speed(original.model, compressed.model, task, **options)
    return {"checkpoint": compressed.name, "baseline": original.name, **result}


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
    return "\n".join(lines)


def _load_note(load: dict[str, Any] | None) -> str:
    if not load or load.get("before") is None:
        return ""
    show = lambda v: " ".join(f"{x:.2f}" for x in v) if v else "?"  # noqa: E731
    return f"; load average before {show(load['before'])}, after {show(load['after'])}"
