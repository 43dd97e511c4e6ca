"""Host memory: predicted before a run (from headers, shapes and options, nothing read), measured
during it (the process's peak resident set), and the memory a run may use.

The prediction adds, to what the process holds already (measured: the runtime and libraries), the
largest of the phases each execution mode goes through:

- whole-model: the model, with what its compressed layers hold beyond the dense weights (each method
  declares it: MethodConfig.resident_bytes); the frozen original when a stage compares against it;
  the largest stage's working memory (MethodConfig.working_bytes); one batch's forward. Then, once
  saved (tensor by tensor, nothing buffered), the reloaded copy and the original read back for
  evaluation, the model itself released.
- whole-model, sharded (several ranks, FSDP2, sharding.py): the same, with each rank's share of the
  gradients and AdamW moments only; the model itself is counted whole, as it is between stages.
- sequential: what lies outside the blocks; the largest unit, read and compressed, with its stages'
  working memory; one batch's forward; the activations carried between blocks (in the model's dtype,
  up to the in-memory budget, the rest spills to disk).
"""
from __future__ import annotations

import errno
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ResourceError

SAFETY = 1.10  # allocator slack and fragmentation, measured on MiniLM and generated Llama checkpoints


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20


def return_freed_memory_promptly() -> bool:
    """Make glibc serve allocations of 1 MiB and more by mmap, so freeing them returns them to the system.

    glibc's default threshold adapts upwards (to 32 MiB) as large blocks are freed, after which freed
    activations, optimiser states and temporary copies stay in its heaps: a fine-tuning run then shows
    about a gigabyte it no longer uses. Measured on MiniLM: 10-20% lower peak RSS, 5-7% longer runs.
    An explicit MALLOC_MMAP_THRESHOLD_ in the environment wins; elsewhere than glibc this does nothing."""
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def release_free_heap() -> bool:
    """Hand every free page of glibc's heaps back to the system (malloc_trim), so that a reading of the
    resident set taken next counts only memory in use; elsewhere than glibc this does nothing."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


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


def peak_rss() -> int:
    """The process's peak resident set, since it started or since a PeakMemory reset it."""
    return _status("VmHWM")


_OUT_OF_MEMORY_WORDS = ("can't allocate memory", "Cannot allocate memory", "std::bad_alloc")


def is_out_of_memory(err: BaseException) -> bool:
    """Python's MemoryError, CUDA's OutOfMemoryError, or a library whose allocation failed: torch's CPU
    allocator (a plain RuntimeError), a failed mmap (ENOMEM), C++'s bad_alloc."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(err, OSError) and err.errno == errno.ENOMEM:
        return True
    return isinstance(err, Exception) and any(w in str(err) for w in _OUT_OF_MEMORY_WORDS)


@contextmanager
def explain_out_of_memory(what: str, fix: str) -> Iterator[None]:
    """Turn running out of memory inside the block into a ResourceError saying what to lower.

    Context managers inside the block (the output's temporary directory) have cleaned up by the time
    this runs, so the message is the only thing the failed run leaves."""
    try:
        yield
    except BaseException as err:
        if not is_out_of_memory(err):
            raise
        where = "GPU memory" if isinstance(err, torch.OutOfMemoryError) and "CUDA" in str(err) else "memory"
        raise ResourceError(f"{what} ran out of {where} (peak resident {_status('VmHWM') / 1024**3:.2f} GiB)",
                            fix) from None


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
        return peak_rss()


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
    gpu: dict[str, int] | None = None  # mode -> predicted peak GPU memory, when the run is on CUDA
    sharded: int | None = None  # of the whole-model path with recovery sharded across the ranks; None: one process

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Measured on CPU (MiniLM, tiny Llama; float32): what autograd keeps per token, per unit of width, per
# block for the backward pass, and what one block's no-grad forward holds at once.
TRAINING_BYTES = 48
INFERENCE_BYTES = 32
LOGIT_COPIES = 4  # an LM head's logits, their float copy, softmaxes and gradient


@dataclass(frozen=True)
class Workload:
    """What a stage's working memory depends on; MethodConfig.working_bytes reads it."""

    weights: int  # targeted weights (elements)
    largest_layer: int  # elements of the largest targeted weight
    fan_in: int  # the widest input of a targeted layer (a Hessian is fan_in x fan_in)
    value_bytes: int  # bytes per value in the run's dtype
    model_bytes: int  # the model (whole-model runs) or the unit (block by block) the stage works on
    blocks: int  # transformer blocks the stage runs through
    width: int  # hidden size
    heads: int
    vocab: int  # width of an LM head the training loss goes through (0 when none)
    batch_tokens: int  # tokens per training or calibration step
    seq_len: int
    calibration_tokens: int  # every calibration token
    captures: bool  # whole-model runs capture block inputs/outputs for reconstruction in the stage's memory
    shards: int = 1  # ranks the training state is split across (sharded recovery)

    def activations(self, tokens: int | None = None, blocks: int | None = None) -> int:
        """What autograd keeps for a forward and backward over `tokens` through `blocks` blocks."""
        tokens = self.batch_tokens if tokens is None else tokens
        blocks = self.blocks if blocks is None else blocks
        per_block = tokens * (self.width * TRAINING_BYTES + self.heads * self.seq_len * 8)  # float32: see below
        return blocks * per_block + LOGIT_COPIES * tokens * self.vocab * 4

    def optimiser(self, param_bytes: int) -> int:
        """Gradients and AdamW's two moments in float32 (a rank's share, sharded), and the float32 master copy
        low-precision weights train as (training.float32_master: 4 - value_bytes more per value)."""
        values = param_bytes // self.value_bytes
        return 3 * 4 * values // self.shards + (4 - self.value_bytes) * values


def inference_bytes(width: int, heads: int, seq_len: int, batch_tokens: int, vocab: int) -> int:
    """What a no-grad forward of a batch holds at once: one block's intermediates, and an LM head's logits."""
    return batch_tokens * (width * INFERENCE_BYTES + heads * seq_len * 8) + 2 * batch_tokens * vocab * 4


def param_bytes(model: nn.Module, value_bytes: int, prefix: str = "") -> int:
    """Bytes of the parameters and buffers under `prefix` (tied tensors once), floating point in `value_bytes`."""
    seen, total = set(), 0
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if (prefix and not name.startswith(prefix)) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * (value_bytes if tensor.is_floating_point() else tensor.element_size())
    return total


def _weight_shapes(model: nn.Module, names: list[str]) -> list[tuple[int, ...]]:
    """Each named layer's weight shape (its dense shape for compressed layers)."""
    shapes = []
    for name in names:
        module = model.get_submodule(name)
        dense = getattr(module, "dense_equivalent", None)
        shape = dense()["weight"] if dense else getattr(getattr(module, "weight", None), "shape", None)
        if shape is not None:
            shapes.append(tuple(shape))
    return shapes


@dataclass
class _Shape:
    """The model and data sizes the prediction needs (read from the skeleton's config and the options)."""

    width: int
    heads: int
    vocab: int
    seq_len: int
    batch_tokens: int
    calibration_tokens: int
    eval_tokens: int


def _shape(skeleton: nn.Module, arch, recipe, options) -> _Shape:
    config = getattr(skeleton, "config", None)
    width = arch.blocks[0].width if arch.blocks else getattr(config, "hidden_size", 768)
    heads = getattr(config, "num_attention_heads", None) or max(1, width // 64)
    if config is not None and hasattr(config, "vocab_size"):  # text: sequences up to max_length tokens
        seq_len = options.max_length
        lm_head = type(skeleton).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        vocab = config.vocab_size if lm_head else 0
    else:  # images: one token per patch, plus the class token
        seq_len = getattr(getattr(skeleton, "patch_embed", None), "num_patches", 196) + 1
        vocab = 0
    uses_data = any(s.config.needs_data() for s in recipe.stages)
    calibration = options.calibration_examples if uses_data else 0
    evaluation = 0
    if options.evaluate and not options.dry_run:
        evaluation = options.eval_examples or _eval_examples(options.data)
    # Without data, the only batch is the reload check's synthetic one (2 sequences of 16 tokens).
    batch_tokens = options.batch_size * seq_len if uses_data or evaluation else 2 * min(seq_len, 16)
    return _Shape(width, heads, vocab, seq_len, batch_tokens, calibration * seq_len, evaluation * seq_len)


def _eval_examples(spec: str | None) -> int:
    """Examples in the eval split of the data the run will read (the splits are cheap to count)."""
    from .data import load_examples, split

    try:
        return len(split(load_examples(spec or "pydoc")).eval)
    except Exception:  # an unreadable --data fails later with its own error; predict a typical split
        return 256


def predict_memory(source, skeleton: nn.Module, recipe, targets: list[list[str]], options) -> MemoryPrediction:
    """Predicted peak RSS of both modes for `recipe` on `source` (see the module docstring)."""
    from .architectures import detect
    from .distributed import world
    from .sequential import plan_units, sequential_problem

    value_bytes = (options.dtype or source.stored_dtype()).itemsize
    baseline = current_rss()
    arch = detect(skeleton)
    shape = _shape(skeleton, arch, recipe, options)
    model_bytes = param_bytes(skeleton, value_bytes)
    dry = options.dry_run

    def workload(names: list[str], part_bytes: int, blocks: int, shards: int = 1) -> Workload:
        shapes = _weight_shapes(skeleton, names)
        sizes = [math.prod(s) for s in shapes]
        fan_in = max((math.prod(s[1:]) for s in shapes), default=0)
        return Workload(sum(sizes), max(sizes, default=0), fan_in, value_bytes, part_bytes, blocks, shape.width, shape.heads,
                        shape.vocab, shape.batch_tokens, shape.seq_len, shape.calibration_tokens,
                        captures=part_bytes == model_bytes, shards=shards)

    def working(stage_names: list[list[str]], part_bytes: int, blocks: int, shards: int = 1) -> int:
        return max([s.config.working_bytes(workload(names, part_bytes, blocks, shards))
                    for s, names in zip(recipe.stages, stage_names)] or [0])

    forward = inference_bytes(shape.width, shape.heads, shape.seq_len, shape.batch_tokens, shape.vocab)
    keeps_original = not dry and any(s.config.needs_original() for s in recipe.stages)
    blocks = max(1, len(arch.blocks))
    resident = sum(s.config.resident_bytes(workload(names, model_bytes, blocks))
                   for s, names in zip(recipe.stages, targets))
    whole = {"model": model_bytes, "compressed layers": max(0, resident),
             "original": model_bytes if keeps_original else 0, "stages": working(targets, model_bytes, blocks),
             "forward": forward}
    whole_peak = sum(whole.values())
    ranks = world().size
    sharded = {**whole, "stages": working(targets, model_bytes, blocks, ranks)} if ranks > 1 else None
    if not dry:  # saved, the model gives way to its reloaded copy, evaluated beside the original read back
        verify = model_bytes + resident + (model_bytes if options.evaluate else 0) + forward
        whole["verify"] = verify
        whole_peak = max(whole_peak, verify)
    phases = {"whole-model": whole}
    sharded_peak = None
    if sharded is not None:
        phases["sharded"] = sharded
        sharded_peak = max(sum(sharded.values()), whole.get("verify", 0))

    problem = sequential_problem(recipe, targets, arch.blocks)
    sequential_peak = None
    if problem is None:
        block_bytes = [param_bytes(skeleton, value_bytes, b.name + ".") for b in arch.blocks]
        units = plan_units(recipe, targets, arch.blocks)
        heaviest = max(units, key=lambda unit: sum(block_bytes[i] for i in unit))
        unit_bytes = sum(block_bytes[i] for i in heaviest)
        prefixes = tuple(arch.blocks[i].name + "." for i in heaviest)
        unit_targets = [[n for n in names if (n + ".").startswith(prefixes)] for names in targets]
        targets_kept = any(s.config.needs_original() for s in recipe.stages) and not dry
        streams = 1 + (len(heaviest) if targets_kept or len(heaviest) > 1 else 0)
        carried = (shape.calibration_tokens * streams + 2 * shape.eval_tokens) * shape.width * value_bytes
        unit_resident = sum(s.config.resident_bytes(workload(names, unit_bytes, len(heaviest)))
                            for s, names in zip(recipe.stages, unit_targets))
        seq = {"outside blocks": model_bytes - sum(block_bytes), "unit": unit_bytes + max(0, unit_resident),
               "stages": working(unit_targets, unit_bytes, len(heaviest)), "forward": forward,
               "activations": min(carried, options.activation_bytes())}
        phases["sequential"] = seq
        sequential_peak = int(baseline + SAFETY * sum(seq.values()))
    gpu = None
    if options.resolved_device.startswith("cuda"):  # everything the model computes with lives there; data stays on the host
        gpu = {"whole-model": int(SAFETY * whole_peak)}
        if sharded_peak is not None:
            gpu["sharded"] = int(SAFETY * sharded_peak)
        if "sequential" in phases:
            seq = phases["sequential"]
            gpu["sequential"] = int(SAFETY * (seq["outside blocks"] + seq["unit"] + seq["stages"] + seq["forward"]))
    return MemoryPrediction(int(baseline + SAFETY * whole_peak), sequential_peak, problem and problem.problem,
                            phases, baseline, gpu,
                            None if sharded_peak is None else int(baseline + SAFETY * sharded_peak))


__all__ = ["MemoryPrediction", "PeakMemory", "available_memory", "current_rss", "peak_rss", "predict_memory"]
