"""The peak memory of both execution modes, predicted before any weight is read (from headers, shapes and
options), and the mode chosen from it: whole-model, block by block, or a refusal saying what to lower; and
whether recovery is sharded across the ranks.

The prediction adds, to what the process holds already (measured: the runtime and libraries), the
largest of the phases each execution mode goes through:

- whole-model: the model, with what its compressed layers hold beyond the dense weights (each method
  declares it: MethodConfig.resident_bytes); the frozen original when a stage compares against it;
  the largest stage's working memory (MethodConfig.working_bytes); one batch's forward. Then, once
  saved (tensor by tensor, nothing buffered), the reloaded copy and the original read back for
  evaluation, the model itself released.
- whole-model, sharded (several ranks, FSDP2): the same, with each rank's share of the gradients and
  AdamW moments only; the model itself is counted whole, as it is between stages.
- sequential: what lies outside the blocks; the largest unit, read and compressed, with its stages'
  working memory; one batch's forward; the activations carried between blocks (in the model's dtype,
  up to the in-memory budget, the rest spills to disk). On a GPU the host also holds the next unit, read
  ahead while the current one computes (engine/read_ahead.py).

On CUDA the GPU's peak is predicted too (everything the model computes with lives there; the data, the
activations carried between blocks and the unit read ahead stay on the host), and the mode must fit both
the host's budget and the GPU's free memory: a model that fits the host but not the GPU runs block by
block on the GPU, one unit resident.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from compresscli.core.errors import CompressError
from compresscli.core.resources import current_rss
from compresscli.engine.options import RunOptions
from compresscli.engine.planning import plan_units, sequential_problem
from compresscli.engine.recipe import Recipe
from compresscli.io.data import load_examples, split
from compresscli.methods.cost import Workload, inference_bytes
from compresscli.model.architecture import detect
from compresscli.training import distributed
from compresscli.training.sharding import require_processes

SAFETY = 1.10  # allocator slack and fragmentation, measured on MiniLM and generated Llama checkpoints


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
    try:
        return len(split(load_examples(spec or "pydoc")).eval)
    except Exception:  # an unreadable --data fails later with its own error; predict a typical split
        return 256


def predict_memory(source, skeleton: nn.Module, recipe: Recipe, targets: list[list[str]],
                   options: RunOptions) -> MemoryPrediction:
    """Predicted peak RSS of both modes for `recipe` on `source` (see the module docstring)."""
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
    ranks = distributed.world().size
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
        if options.resolved_device.startswith("cuda"):
            seq["next unit"] = unit_bytes
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


# ----------------------------------------------------------------------------- mode

def shard_wanted(options: RunOptions, mode: str, prediction: MemoryPrediction) -> bool:
    """Whether a run's recovery is sharded: as asked (--shard / --no-shard), else when several processes
    run the whole model and one rank's training state would not fit its memory (its GPU's on CUDA, its
    share of the host's on the CPU, where the ranks share it) while a rank's share of it would."""
    size = distributed.world().size
    if options.shard:
        require_processes(size)
    if options.shard and mode == "sequential":
        raise CompressError("--shard shards a whole-model run, but this one goes block by block (one block in "
                            "memory at a time)", "drop --shard, or --sequential (or raise --max-memory)")
    if options.shard is not None or size == 1 or mode != "whole-model" or prediction.sharded is None:
        return bool(options.shard)
    if prediction.gpu:
        free = gpu_free_bytes(options.resolved_device)
        return prediction.gpu["whole-model"] > free >= prediction.gpu["sharded"]
    budget = options.memory_budget() // int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return prediction.whole_model > budget >= prediction.sharded


def gpu_free_bytes(device: str) -> int:
    """Free memory of the CUDA `device` now, as the driver reports it (other processes' use excluded)."""
    return torch.cuda.mem_get_info(torch.device(device))[0]


def _gpu_need(prediction: MemoryPrediction, options: RunOptions, mode: str) -> int:
    """The GPU memory `mode` is predicted to need (0 off CUDA); a whole-model run under torchrun that may
    shard its recovery needs the sharded figure (shard_wanted then shards it)."""
    gpu = prediction.gpu or {}
    need = gpu.get(mode, 0)
    if mode == "whole-model" and "sharded" in gpu and options.shard is not False:
        need = min(need, gpu["sharded"])
    return need


def choose_mode(prediction: MemoryPrediction, options: RunOptions, recipe: Recipe) -> str:
    """"whole-model" or "sequential": as asked, else whichever fits the budget (whole-model first,
    unless a stage prefers block by block and the recipe can run so) and, on CUDA, the GPU's free
    memory; a run that fits neither is refused with what to lower."""
    budget = options.memory_budget()
    if options.sequential is False:
        return "whole-model"
    free = gpu_free_bytes(options.resolved_device) if prediction.gpu else None
    whole_fits = prediction.whole_model <= budget and \
        (free is None or _gpu_need(prediction, options, "whole-model") <= free)
    sequential_fits = prediction.sequential is not None and prediction.sequential <= budget and \
        (free is None or _gpu_need(prediction, options, "sequential") <= free)
    prefers = any(stage.config.prefers_block_by_block for stage in recipe.stages)
    if prefers and options.sequential is None and sequential_fits:
        return "sequential"
    if options.sequential or not whole_fits:
        where = f"{gib(budget)} of host memory" + (f" and {gib(free)} free on the GPU" if free is not None else "")
        if prediction.sequential is None:
            raise CompressError(f"the whole-model run needs about {_needs(prediction, options, 'whole-model')} but "
                                f"{where} is available, and it cannot run block by block "
                                f"({prediction.sequential_problem})", "free memory, raise --max-memory, or "
                                "change the recipe")
        if not sequential_fits:
            raise CompressError(f"even block by block the run needs about {_needs(prediction, options, 'sequential')} "
                                f"but {where} is available", "lower --calibration-examples, --max-length or "
                                "--batch-size, or raise --max-memory" + (" (or use a larger GPU)" if free else ""))
        return "sequential"
    return "whole-model"


def _needs(prediction: MemoryPrediction, options: RunOptions, mode: str) -> str:
    host = prediction.whole_model if mode == "whole-model" else prediction.sequential
    if not prediction.gpu:
        return gib(host)
    return f"{gib(host)} of host memory and {gib(_gpu_need(prediction, options, mode))} on the GPU"


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"
