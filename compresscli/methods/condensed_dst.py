"""Dynamic sparse training of condensed layers during recovery (SRigL): the condensed stage leaves its mask
schedule on each layer it builds (`attach`); the recovery stages that follow (finetune, reconstruct) find the
layers they train that carry one (`dynamic_sparsity`) and run these hooks in the training loop.

On a step that updates a layer, its forward keeps dL/dW of the whole dense weight (the codec's
dense_grad_sink: the training product computes it anyway); after the backward, summed over the ranks
(each rank's loss already carries its share, as the loop's all_reduce of the values' gradients does), the
layer's topology is updated (condensed_update.py) and installed: values and int16 indices rebuilt, a new
Parameter when k or the kept rows change (training.loop.replace_parameter), AdamW's moments following
their slot (new slots start at 0), and the values' gradient for this step's optimiser step set to dL/dW at
the new positions (exact: new weights are 0). Every rank computes the same update; a checksum says so.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compresscli.codecs.condensed.codec import _Condensed
from compresscli.codecs.sparse.encoding import index_dtype
from compresscli.core.errors import CompressError
from compresscli.methods.condensed_update import Topology, old_slots, update_topology
from compresscli.methods.mask_schedule import UpdateSchedule
from compresscli.training import distributed
from compresscli.training.loop import StepHooks, replace_parameter

ATTRIBUTE = "mask_updates"  # where a condensed layer carries its DynamicSparsity between stages


@dataclass(frozen=True)
class DynamicSparsity:
    """How a condensed layer's inputs move during the recovery stages after the stage that built it."""

    update: Literal["rigl", "set"]  # regrow by |dL/dW| (RigL / SRigL) or at random (SET)
    schedule: UpdateSchedule
    min_salient: float | None = None  # SRigL ablation at every update; None: every neuron stays
    n_m: tuple[int, int] | None = None
    k_multiple: int = 1

    @property
    def needs_gradient(self) -> bool:
        return self.update == "rigl" or self.min_salient is not None


def attach(layer: _Condensed, settings: DynamicSparsity) -> None:
    setattr(layer, ATTRIBUTE, settings)


def dynamic_sparsity(model: nn.Module, params: list[nn.Parameter], steps: int, seed: int) -> "CondensedDST | None":
    """The hooks for the condensed layers of `model` whose values train among `params` and that carry a
    schedule; None when there are none."""
    trained = {id(p) for p in params}
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, _Condensed) and getattr(m, ATTRIBUTE, None) is not None and id(m.values) in trained}
    return CondensedDST(layers, steps, seed) if layers and steps > 0 else None


class CondensedDST(StepHooks):
    edits_parameters = True

    def __init__(self, layers: dict[str, _Condensed], steps: int, seed: int):
        self.layers, self.steps, self.seed = layers, steps, seed
        self.budgets = {name: layer.values.numel() for name, layer in layers.items()}
        self.initial = {name: (_row_ids(layer), layer.indices.long().clone()) for name, layer in layers.items()}
        self.grown = dict.fromkeys(layers, 0)
        self.updates = dict.fromkeys(layers, 0)
        self.grads: dict[str, torch.Tensor] = {}

    def _due(self, step: int) -> list[str]:
        return [name for name, layer in self.layers.items()
                if getattr(layer, ATTRIBUTE).schedule.updating(step, self.steps)]

    def before_forward(self, step: int) -> None:
        for name in self._due(step):
            layer = self.layers[name]
            if getattr(layer, ATTRIBUTE).needs_gradient:
                layer.dense_grad_sink = lambda g, name=name: self._keep(name, g)

    def _keep(self, name: str, grad: torch.Tensor) -> None:
        """Accumulates: a layer called twice in a step (shared, recomputed) adds its gradients, as autograd does."""
        grad = grad.detach().float().reshape(self.layers[name].out_features, -1)
        self.grads[name] = grad.clone() if name not in self.grads else self.grads[name].add_(grad)

    @torch.no_grad()
    def after_backward(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        due = self._due(step)
        checksum = 0
        for position, name in enumerate(self.layers):
            if name not in due:
                continue
            layer, settings = self.layers[name], getattr(self.layers[name], ATTRIBUTE)
            layer.dense_grad_sink = None
            grad = self.grads.pop(name, None)
            if settings.needs_gradient:  # a rank with an empty shard ran no forward: it adds zeros
                if grad is None:
                    grad = torch.zeros(layer.out_features, layer.fan_in, device=layer.values.device)
                distributed.sum_over_ranks(grad)
            generator = None
            if settings.update == "set":  # the same draw on every rank
                generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + position)
            topology = update_topology(layer.values, layer.indices, layer.rows, grad,
                                       settings.schedule.fraction(step, self.steps), self.budgets[name],
                                       layer.out_features, layer.fan_in, generator=generator, n_m=settings.n_m,
                                       min_salient=settings.min_salient, k_multiple=settings.k_multiple)
            install(layer, topology, optimizer, grad)
            self.grown[name] += topology.grown
            self.updates[name] += 1
            checksum = zlib.crc32(layer.indices.cpu().numpy().tobytes(), checksum)
            if layer.rows is not None:
                checksum = zlib.crc32(layer.rows.cpu().numpy().tobytes(), checksum)
        if due and not distributed.same_on_every_rank(checksum):
            raise CompressError(f"the ranks chose different condensed masks at step {step} (a bug: the update is "
                                "meant to be deterministic)", "run it in one process, and report it with --debug")

    def finish(self) -> None:
        for layer in self.layers.values():
            layer.dense_grad_sink = None
        self.grads.clear()

    def summary(self) -> dict[str, Any]:
        """What moved: per layer its k, ablated neurons, the fraction of its mask entries not in the mask it
        started with (`changed`), and the entries grown over all updates per entry of the budget (`moved`)."""
        per_layer, changed, budget = {}, 0, 0
        for name, layer in self.layers.items():
            old_rows, old_idx = self.initial[name]
            kept = int((old_slots(old_rows, old_idx, _row_ids(layer), layer.indices.long(),
                                   layer.out_features) >= 0).sum())
            per_layer[name] = {"k": layer.k, "ablated": layer.out_features - layer.values.shape[0],
                               "changed": round(1 - kept / layer.values.numel(), 4),
                               "moved": round(self.grown[name] / self.budgets[name], 4), "updates": self.updates[name]}
            changed += layer.values.numel() - kept
            budget += layer.values.numel()
        return {"mask_updates": max(self.updates.values(), default=0), "mask_changed": round(changed / budget, 4),
                "ablated_neurons": sum(p["ablated"] for p in per_layer.values()), "mask_per_layer": per_layer}


def _row_ids(layer: _Condensed) -> torch.Tensor:
    return torch.arange(layer.out_features, device=layer.indices.device) if layer.rows is None else layer.rows.long()


def install(layer: _Condensed, topology: Topology, optimizer: torch.optim.Optimizer,
            grad: torch.Tensor | None) -> None:
    """The new topology into the layer and the optimiser (see the module docstring)."""
    old = layer.values
    values = topology.values.to(old.dtype)
    old_grad = old.grad
    if values.shape == old.shape:
        param = old
        param.data = values
    else:
        param = nn.Parameter(values, requires_grad=old.requires_grad)
    remap = (lambda tensor: _remap(tensor, topology.slot_map))
    replace_parameter(optimizer, old, param, remap)
    if param is not old:
        layer.values = param
    layer.indices = topology.indices.to(index_dtype(layer.fan_in)).contiguous()
    layer.rows = None if topology.rows is None else topology.rows.to(index_dtype(layer.out_features))
    if grad is not None:
        param.grad = grad[_row_ids(layer)].gather(1, topology.indices).to(param.dtype)
    elif old_grad is not None:
        param.grad = remap(old_grad)


def _remap(tensor: torch.Tensor, slot_map: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    return torch.where(slot_map >= 0, flat[slot_map.clamp_min(0)], torch.zeros((), dtype=tensor.dtype,
                                                                               device=tensor.device))
