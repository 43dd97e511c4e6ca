"""Host memory: predicted before a run (from headers, shapes and options, nothing read), measured
during it (the process's peak resident set), and the memory a run may use.

The prediction adds, to what the process holds already (measured: the runtime and libraries), the
largest of the phases each execution mode goes through:

- whole-model: the model; the frozen original when a stage compares against it; the largest stage's
  working memory (each method declares it: MethodConfig.working_bytes); then saving (one shard), the
  reload check (the model and its reloaded copy) and evaluation (the model and the original read back).
- sequential: what lies outside the blocks; the largest unit, read and compressed (twice its weights
  plus the stages' working memory); the activations carried between blocks (in the model's dtype,
  up to the in-memory budget, the rest spills to disk); the output shard being filled.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

SAFETY = 1.10  # allocator slack and fragmentation, measured on MiniLM and generated Llama checkpoints


def _status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss() -> int:
    return _status("VmRSS")


class PeakMemory:
    """The process's peak resident set from now on (Linux's VmHWM, reset at start where the kernel allows)."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.since_start = True
        except OSError:
            self.since_start = False  # then the peak includes what ran before

    def peak(self) -> int:
        return _status("VmHWM")


def available_memory() -> int:
    """Bytes this process may still use: MemAvailable, capped by a cgroup limit when there is one."""
    available = math.inf
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                available = min(available, int(limit) - int(f.read()))
    except (OSError, ValueError):
        pass
    if available is math.inf:
        return 1 << 62
    return int(available) + current_rss()  # what the run may reach, counting what it holds already


@dataclass
class MemoryPrediction:
    whole_model: int  # predicted peak RSS of the whole-model path, bytes
    sequential: int | None  # of the block-by-block path; None when it cannot run that way
    sequential_problem: str | None = None
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # mode -> phase -> bytes above baseline
    baseline: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def param_bytes(model: nn.Module, value_bytes: int, prefix: str = "") -> int:
    """Bytes of the parameters and buffers under `prefix` (tied tensors once), floating point in `value_bytes`."""
    seen, total = set(), 0
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if (prefix and not name.startswith(prefix)) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * (value_bytes if tensor.is_floating_point() else tensor.element_size())
    return total


def _weights(model: nn.Module, names: list[str]) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in names if hasattr(model.get_submodule(n), "weight"))


def predict_memory(source, skeleton: nn.Module, recipe, targets: list[list[str]], options) -> MemoryPrediction:
    """Predicted peak RSS of both modes for `recipe` on `source` (see the module docstring)."""
    from .architectures import detect

    value_bytes = (options.dtype or source.stored_dtype()).itemsize
    baseline = current_rss()
    model_bytes = param_bytes(skeleton, value_bytes)
    dry = options.dry_run
    keeps_original = not dry and any(s.config.needs_original() for s in recipe.stages)
    working = max([s.config.working_bytes(_weights(skeleton, names), value_bytes, model_bytes)
                   for s, names in zip(recipe.stages, targets)] or [0])
    whole = {"model": model_bytes, "original": model_bytes if keeps_original else 0, "stages": working}
    if not dry:
        whole["saving"] = min(options.shard_bytes, model_bytes)
        whole["verify"] = model_bytes  # the reloaded copy, then the original read back for evaluation
    whole_peak = model_bytes + max(whole["original"] + working, whole.get("saving", 0), whole.get("verify", 0))
    phases = {"whole-model": whole}

    arch = detect(skeleton)
    problem = _sequential_problem(recipe, arch)
    sequential_peak = None
    if problem is None:
        block_bytes = [param_bytes(skeleton, value_bytes, b.name + ".") for b in arch.blocks]
        outer = model_bytes - sum(block_bytes)
        from .sequential import plan_units

        units = plan_units(recipe, targets, arch.blocks)
        unit_bytes = max(sum(block_bytes[i] for i in unit) for unit in units)
        unit_names = [[n for n in names if any(n.startswith(arch.blocks[i].name + ".") for i in units[0])]
                      for names in targets]
        unit_working = max([s.config.working_bytes(_weights(skeleton, names), value_bytes, unit_bytes)
                            for s, names in zip(recipe.stages, unit_names)] or [0])
        width = arch.blocks[0].width
        tokens = _tokens(options, recipe, skeleton)
        streams = 3 if any(s.config.needs_original() for s in recipe.stages) else 2  # inputs, outputs, next
        activations = min(tokens * width * value_bytes * streams * max(len(u) for u in units),
                          options.activation_bytes())
        seq = {"outer": outer, "unit": 2 * unit_bytes, "stages": unit_working, "activations": activations,
               "shard": 0 if dry else min(options.shard_bytes, model_bytes)}
        phases["sequential"] = seq
        sequential_peak = int(baseline + SAFETY * sum(seq.values()))
    return MemoryPrediction(int(baseline + SAFETY * whole_peak), sequential_peak, problem, phases, baseline)


def _tokens(options, recipe, skeleton: nn.Module) -> int:
    """Positions carried per activation stream: calibration plus evaluation examples times length."""
    length = options.max_length if hasattr(getattr(skeleton, "config", None), "vocab_size") else 256
    calibration = options.calibration_examples if any(s.config.needs_data() for s in recipe.stages) else 0
    evaluation = (options.eval_examples or 256) if options.evaluate and not options.dry_run else 0
    return (calibration + 2 * evaluation + 2) * length


def _sequential_problem(recipe, arch) -> str | None:
    if not arch.blocks:
        return "no repeated blocks were found"
    if len({b.stage for b in arch.blocks}) > 1:
        return "its blocks sit in stages of different widths"
    for i, stage in enumerate(recipe.stages):
        reason = stage.config.whole_model_only()
        if reason:
            return f"stage {i} ({stage.method}): {reason}"
    return None


__all__ = ["MemoryPrediction", "PeakMemory", "available_memory", "current_rss", "predict_memory"]
