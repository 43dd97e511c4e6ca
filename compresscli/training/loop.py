"""One training loop for every recovery stage: `finetune` (distillation on the train split) and
`reconstruct` (block outputs on calibration chunks, also FiPS's own reconstruction).

AdamW with linear warm-up and cosine decay, bf16 autocast on CUDA, items drawn in a seeded random
order (every item once per pass), optional gradient clipping, hooks around each step, and a NaN/inf
loss stops the run with DivergedError (nothing gets written). The reported loss is averaged over the
last tenth of the steps.

Data-parallel under torchrun (distributed.py): every rank holds every item and draws them in the same
seeded order; each item (a global batch) is split into disjoint contiguous per-rank shards, so the
global batch, and the figures, are those of one process. Each rank's loss is scaled by its shard's
share of the batch (`weight`: examples by default, real tokens for block reconstruction) and the
gradients are summed across ranks with one all_reduce per step, before the hooks, clipping and the
optimiser step: every rank then takes the same step, and the reported loss is the global mean. For
losses that are means over examples (or, with the right weight, over tokens) this is exactly the
one-process gradient, up to the order of floating-point additions.
Why an all_reduce of the gradients and not DistributedDataParallel: the loop trains a list of
parameters through a loss closure that calls the model (or a list of blocks) itself, so there is no
single module forward for DDP to wrap; hooks (FiPS's RigL) must see the averaged gradient before they
change masks; and a rank whose shard is empty (a batch smaller than the world) must still take part.
The summed, weighted all_reduce is DDP's computation, in one coalesced call per step.

Sharded (`shard=True`, FSDP2, training/sharding.py): the loss runs on the stand-ins of `modules`, whose
parameters, gradients and AdamW moments are split across the ranks; FSDP's reduce-scatter sums the
weighted gradients in place of the all_reduce (which still sums the few parameters kept whole and the
loss), and after the last step every rank gathers the trained tensors back into the model. Every rank
then runs every forward and backward, FSDP's collectives being inside them: a rank whose shard of the
batch is empty computes on the whole batch with weight 0, and a non-finite loss still goes backward
before every rank refuses it together.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from compresscli.training import distributed, sharding
from compresscli.core.errors import CompressError, DivergedError
from compresscli.core.resources import peak_rss
from compresscli.core.progress import Progress, SilentProgress


@dataclass
class TrainConfig:
    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps with linear warm-up
    max_grad_norm: float = 0.0  # 0: no clipping


class StepHooks:
    """Called around every optimiser step; the default does nothing (FiPS's mask schedule and condensed's
    dynamic sparse training override it). A hook that gives a parameter another shape puts a new Parameter in
    its place with `replace_parameter`: train() reads its parameter list back from the optimiser after
    `after_backward`, so clipping and the data-parallel all_reduce follow."""

    edits_parameters = False  # True: the hooks read or change parameters or gradients (not possible sharded)

    def before_forward(self, step: int) -> None:
        pass

    def after_backward(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class HookChain(StepHooks):
    """Several hooks, called in the order given."""

    def __init__(self, *hooks: StepHooks):
        self.hooks = hooks
        self.edits_parameters = any(h.edits_parameters for h in hooks)

    def before_forward(self, step: int) -> None:
        for hook in self.hooks:
            hook.before_forward(step)

    def after_backward(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        for hook in self.hooks:
            hook.after_backward(step, optimizer)

    def after_step(self, step: int) -> None:
        for hook in self.hooks:
            hook.after_step(step)

    def finish(self) -> None:
        for hook in self.hooks:
            hook.finish()


def replace_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                      state: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """`new` where `old` was in the optimiser's groups and state (each state tensor shaped like the parameter
    passed through `state`; the rest, AdamW's step, kept). The caller puts `new` in its module. Why not
    `old.data = ...` of another shape: autograd's AccumulateGrad node keeps the leaf's shape, and the loop
    still holds the previous step's graph when the next forward runs, so the next backward would fail."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    saved = optimizer.state.pop(old, None)
    if saved is not None:
        optimizer.state[new] = {key: state(value) if state is not None and torch.is_tensor(value)
                                and value.shape == old.shape else value for key, value in saved.items()}


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# (modules, item) -> (loss, its terms or None); `modules` are train's, or their sharded stand-ins
Loss = Callable[[Sequence[nn.Module], Any], tuple[torch.Tensor, list[torch.Tensor] | None]]
Weight = Callable[[Any], float]  # a shard of an item -> its share of the item's loss (before normalising)


def train(params: list[nn.Parameter], items: Sequence[Any], loss_fn: Loss, config: TrainConfig,
          device: torch.device, seed: int = 0, progress: Progress | None = None, label: str = "training",
          hooks: StepHooks | None = None, fix: str = "lower the lr",
          weight: Weight = distributed.examples_in, modules: Sequence[nn.Module] = (),
          units: Sequence[nn.Module] = (), shard: bool = False) -> dict[str, Any]:
    """Train `params` for config.steps steps, one item per step, the loss computed by `modules` (the
    ones it calls); data-parallel when a process group exists, and with `shard` sharded by FSDP2,
    `units` (submodules of `modules`: blocks) wrapped on their own. Returns the loss statistics (and,
    when the loss has terms, each term averaged over the last tenth of the steps), and every rank's steps
    per second and peak resident memory."""
    progress, hooks = progress or SilentProgress(), hooks or StepHooks()
    if config.steps == 0:
        return {"steps": 0}
    with float32_master(modules):
        return _train(params, items, loss_fn, config, device, seed, progress, label, hooks, fix, weight, modules,
                      units, shard)


LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextmanager
def float32_master(modules: Sequence[nn.Module]) -> Iterator[None]:
    """The float16 / bfloat16 parameters and buffers of `modules` in float32 while they train, back in their
    own dtype after (in place: every Parameter stays the object the optimiser and the model hold). Trained in
    their own dtype they would not learn: AdamW's eps (1e-8) underflows to 0 in float16, so the first step
    divides by zero, and in bfloat16 (8 significant bits) an update smaller than 0.4% of a weight rounds
    away, which at lr 1e-4 is nearly every update. Costs 2 more bytes per trained value while training.
    Restored by name: a tensor a hook replaced while training (replace_parameter) goes back to the dtype of
    the one it replaced."""
    saved: dict[tuple[int, str], torch.dtype] = {}
    seen: set[int] = set()
    for i, module in enumerate(modules):
        for name, tensor in _named_tensors(module):
            if tensor.dtype in LOW_PRECISION and id(tensor) not in seen:
                seen.add(id(tensor))
                saved[i, name] = tensor.dtype
                tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for i, module in enumerate(modules):
            for name, tensor in _named_tensors(module):
                dtype = saved.pop((i, name), None)
                if dtype is not None:
                    tensor.data = tensor.data.to(dtype)
                    tensor.grad = None


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _train(params: list[nn.Parameter], items: Sequence[Any], loss_fn: Loss, config: TrainConfig,
           device: torch.device, seed: int, progress: Progress, label: str, hooks: StepHooks, fix: str,
           weight: Weight, modules: Sequence[nn.Module], units: Sequence[nn.Module], shard: bool) -> dict[str, Any]:
    world = distributed.world()
    sharded = None
    if shard:
        if hooks.edits_parameters:
            raise CompressError(f"{label} changes masks from whole parameters and gradients during training, which "
                                "sharded training splits", "turn the mask updates off (fips: mask_update: fixed; "
                                "condensed: update: none), or drop --shard")
        sharded = sharding.shard(modules, params, units)
        modules, params = sharded.modules, sharded.params
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = int(config.warmup * config.steps)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    generator = torch.Generator().manual_seed(seed)
    tail = max(1, config.steps // 10)
    order: list[int] = []
    losses: list[float] = []
    term_sums: torch.Tensor | None = None
    started = time.perf_counter()
    with progress.task(label, total=config.steps) as bar:
        for step in range(config.steps):
            if not order:
                order = torch.randperm(len(items), generator=generator).tolist()
            item = items[order.pop()]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, config.steps, warmup_steps)
            hooks.before_forward(step)
            optimizer.zero_grad(set_to_none=True)
            if sharded is not None:
                value, terms = _sharded_step(sharded, item, loss_fn, weight, world, autocast, device)
            elif world.distributed:
                value, terms = _data_parallel_step(params, modules, item, loss_fn, weight, world, autocast, device)
            else:
                with autocast:
                    loss, loss_terms = loss_fn(modules, item)
                value = loss.item()
                in_tail = loss_terms is not None and step >= config.steps - tail
                terms = [t.item() for t in loss_terms] if in_tail else None
                if math.isfinite(value):
                    loss.backward()
            if not math.isfinite(value):
                raise DivergedError(f"{label} diverged at step {step} (loss {value})", f"{fix}; nothing was written")
            hooks.after_backward(step, optimizer)
            if hooks.edits_parameters:  # a hook may have replaced a parameter (replace_parameter)
                params = [p for group in optimizer.param_groups for p in group["params"]]
            if config.max_grad_norm > 0:
                clip = sharding.clip_grad_norm_ if sharded is not None else torch.nn.utils.clip_grad_norm_
                clip(params, config.max_grad_norm)
            optimizer.step()
            hooks.after_step(step)
            losses.append(value)
            if terms is not None and step >= config.steps - tail:
                values = torch.tensor(terms, dtype=torch.float64)
                term_sums = values if term_sums is None else term_sums + values
            bar.advance(1, loss=losses[-1])
    optimizer.zero_grad(set_to_none=True)  # no gradient outlives the loop
    if sharded is not None:
        sharded.gather()
    hooks.finish()
    rates = distributed.gather_floats(config.steps / max(time.perf_counter() - started, 1e-9))
    peaks = distributed.gather_floats(float(peak_rss()))  # each rank's, from the run's start to here
    stats = {"steps": config.steps, "first_loss": losses[0], "final_loss": sum(losses[-tail:]) / tail,
             "steps_per_second_per_rank": [round(r, 3) for r in rates],
             "peak_rss_bytes_per_rank": [int(p) for p in peaks]}
    if term_sums is not None:
        stats["final_terms"] = [round(x / tail, 6) for x in term_sums.tolist()]
    return stats


def _shares(item: Any, weight: Weight, world: distributed.World) -> tuple[list[float], float]:
    """Every rank's weight of its shard of `item` (every rank sees every shard), and this rank's share."""
    shares = [weight(distributed.shard(item, r, world.size)) for r in range(world.size)]
    total = sum(shares)
    return shares, shares[world.rank] / total if total else 0.0


def _data_parallel_step(params: list[nn.Parameter], modules: Sequence[nn.Module], item: Any, loss_fn: Loss,
                        weight: Weight, world: distributed.World, autocast: Any,
                        device: torch.device) -> tuple[float, list[float] | None]:
    """Forward and backward on this rank's shard of `item`, its loss scaled by the shard's share, then
    the gradients and the loss summed over the ranks. Returns the global loss and its terms; gradients
    are left as one process would have them (a non-finite loss is left for the caller to refuse)."""
    shares, share = _shares(item, weight, world)
    loss_terms: list[torch.Tensor] | None = None
    scalars = [0.0]
    if share > 0:
        with autocast:
            loss, loss_terms = loss_fn(modules, distributed.shard(item, world.rank, world.size))
        scalars = [share * loss.item()]
        if math.isfinite(scalars[0]):
            (loss * share).backward()
        scalars += [share * t.item() for t in loss_terms or []]
    if 0 in shares:  # a rank with an empty shard cannot know how many terms the loss has: ask the others
        scalars += [0.0] * (int(max(distributed.gather_floats(float(len(scalars))))) - len(scalars))
    sums = distributed.reduce_gradients(params, scalars, device)
    return sums[0], sums[1:] or None


def _sharded_step(sharded: sharding.Sharded, item: Any, loss_fn: Loss, weight: Weight, world: distributed.World,
                  autocast: Any, device: torch.device) -> tuple[float, list[float] | None]:
    """As `_data_parallel_step`, on the stand-ins: every rank runs forward and backward (an empty shard:
    the whole item, weight 0), FSDP sums the sharded gradients, one all_reduce the whole ones and the loss."""
    _, share = _shares(item, weight, world)
    part = distributed.shard(item, world.rank, world.size) if share > 0 else item
    with autocast:
        loss, loss_terms = loss_fn(sharded.modules, part)
    (loss * share).backward()  # even when not finite: the other ranks wait in its reduce-scatter
    scalars = [share * x.item() if share > 0 else 0.0 for x in [loss, *(loss_terms or [])]]
    sums = distributed.reduce_gradients(sharded.whole, scalars, device)
    return sums[0], sums[1:] or None
