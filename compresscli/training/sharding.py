"""Sharded recovery with FSDP2 (torch.distributed.fsdp.fully_shard): a training stage's parameters,
gradients and AdamW moments split across the ranks, for models whose training state does not fit one
device. The loop (loop.py) calls `shard` when a stage asks for it; whether a run's stages do is decided by
engine.prediction.shard_wanted.

Why a stand-in and not the model itself: fully_shard changes the modules it wraps for good (their
class, hooks, and DTensor shards in place of their parameters), while every later stage, the writer
and the reload check need plain modules holding whole tensors. So the loop trains a structural copy:
`copy.deepcopy` with every parameter and buffer in the memo gives new module objects that hold the
model's own tensors (masks and other buffers stay shared). fully_shard then replaces the stand-in's
parameters with shards, and the model's own Parameters give up their storage until `gather` writes
the trained full tensors (DTensor.full_tensor) back into them on every rank, in their own dtype: the
model leaves the stage whole, as it entered it, and rank 0 writes it as in any other run.

What is wrapped: each unit (the blocks of a fine-tuned model, or each block being reconstructed) so
that a unit's parameters are whole only while it computes, then the root the loss runs (the model).
A Parameter reached from more than one wrapped module (a FiPS base shared by a group of blocks, an
RPS memory shared by every targeted layer) is not sharded: fully_shard would give each unit a copy of
its own and the copies would train apart. Those, and 0-dim parameters (which fully_shard refuses),
stay whole on every rank, and the loop all-reduces their gradients as in data-parallel mode.
Gradients are summed, not averaged (the loop weights each rank's loss by its share of the batch):
divide factor 1 and sum reductions, which gloo, lacking AVG and PREMUL_SUM, needs anyway.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist
from torch import nn

from compresscli.training import distributed
from compresscli.core.errors import CompressError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class Sharded:
    modules: list[nn.Module]  # the stand-ins of the modules given, for the loss to call
    params: list[nn.Parameter]  # what the optimiser steps, in the order given: shards, and whole ones
    whole: list[nn.Parameter]  # those of `params` kept whole on every rank (the loop all-reduces their gradients)
    pairs: list[tuple[nn.Parameter, nn.Parameter]]  # (the model's Parameter, its sharded stand-in)

    @torch.no_grad()
    def gather(self) -> None:
        """On every rank (a collective): the trained full tensors back into the model's Parameters."""
        for own, sharded in self.pairs:
            own.data = sharded.full_tensor()


def shard(modules: Sequence[nn.Module], params: Sequence[nn.Parameter], units: Sequence[nn.Module] = ()) -> Sharded:
    """FSDP2 stand-ins of `modules` (the ones the loss calls), each unit of `units` (submodules of
    them) wrapped first; `params` are the parameters to train. Frees the storage of every parameter it
    shards: until `gather`, only the stand-ins compute. A failure on the way leaves the model unusable,
    as the run that fails with it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor  # imported here: FSDP's modules take 0.8 s to import

    require_processes(distributed.world().size)
    memo = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
    stand_ins = copy.deepcopy(list(modules), memo)
    inner = [memo[id(u)] for u in units]  # deepcopy records each original's copy under its id
    whole = _kept_whole(modules, units)
    # the training device's mesh over every rank (fully_shard's default is the accelerator's, even for CPU runs)
    mesh = init_device_mesh(params[0].device.type, (distributed.world().size,))
    for unit in inner:
        _wrap(unit, mesh, whole, reshard_after_forward=True)
    for root in stand_ins:
        # one root stays gathered from its forward to its backward; several (blocks) take turns
        _wrap(root, mesh, whole, reshard_after_forward=None if len(stand_ins) == 1 else True)
    counterpart: dict[int, nn.Parameter] = {}
    for own, stand_in in zip(modules, stand_ins):
        theirs = dict(stand_in.named_parameters())
        for name, p in own.named_parameters():
            counterpart.setdefault(id(p), theirs[name])
    missing = [i for i, p in enumerate(params) if id(p) not in counterpart]
    if missing:
        raise CompressError(f"{len(missing)} parameter(s) to train lie outside the modules being sharded (a bug)",
                            "run without --shard, and report it with --debug output")
    pairs = list({id(p): (p, counterpart[id(p)]) for m in modules for p in m.parameters()
                  if isinstance(counterpart[id(p)], DTensor)}.values())
    for own, _ in pairs:
        own.data = own.data.new_empty(0)
    return Sharded(stand_ins, [counterpart[id(p)] for p in params], [p for p in params if p in whole], pairs)


def require_processes(size: int) -> None:
    if size == 1:
        raise CompressError("sharded recovery (--shard) splits the training state across processes, but this is "
                            "one process", "start the run under torchrun or with --nproc N, or drop --shard")


def _kept_whole(modules: Sequence[nn.Module], units: Sequence[nn.Module]) -> set[nn.Parameter]:
    """Parameters that modules of more than one wrapped module hold (a root's are those outside its
    units), and 0-dim ones: they are not sharded."""
    unit_ids = {id(u) for u in units}
    owners: dict[int, set[int]] = {}
    found: dict[int, nn.Parameter] = {}
    for top in [*units, *modules]:
        stack = [top]
        while stack:
            module = stack.pop()
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(id(top))
                found[id(p)] = p
            stack += [c for c in module.children() if id(c) not in unit_ids]
    return {p for i, p in found.items() if len(owners[i]) > 1 or p.dim() == 0}


def _wrap(module: nn.Module, mesh: DeviceMesh, whole: set[nn.Parameter], reshard_after_forward: bool | None) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=whole)
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def clip_grad_norm_(params: Sequence[nn.Parameter], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ over sharded and whole parameters at once: the squares of the local
    shards summed over the ranks, plus those of the whole gradients (the same on every rank)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() for g in grads if isinstance(g, DTensor)]
    squares = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for g in local:
        squares += g.double().pow(2).sum()
    dist.all_reduce(squares)
    for g in grads:
        if not isinstance(g, DTensor):
            squares += g.double().pow(2).sum()
    scale = min(1.0, max_norm / (math.sqrt(squares.item()) + 1e-6))
    for g in grads:
        g.mul_(scale)


