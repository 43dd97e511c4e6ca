"""Constant fan-in sparsity (after SRigL, Lasby et al., ICLR 2024), stored and run in condensed form.

Every kept output neuron keeps exactly k of its inputs, k = round((1 - sparsity) * fan_in), optionally
rounded up to a multiple of `k_multiple` for vector loads; N:M (keep N of every M consecutive inputs,
e.g. 2:4) is the special case where the k inputs are spread evenly. The inputs are the per-neuron top-k
of a score: |W|, or |W| * ||X_j|| with X the layer's inputs on the calibration data.

With `ablate`, SRigL's neuron ablation: a neuron with too few salient weights (salient = among the
layer's top (1 - sparsity) fraction of scores, i.e. what unstructured pruning at the same density
would keep) is removed, its budget goes to the survivors (k grows, the layer's total stays), and its
bias is kept, so it outputs a constant. SRigL decides this during training from weight and gradient
saliency; one-shot, the score is all there is. The threshold is relative to k (SRigL's
"sparse const fan-in" variant): a neuron needs min_salient * k salient weights to stay.

With `update: rigl` or `set`, the mask keeps learning in every recovery stage that follows (finetune,
reconstruct): SRigL's dynamic sparse training (condensed_dst.py). Every `every` steps until `until` of
the stage's steps, each layer drops the smallest |W| and every neuron regrows exactly what it lost, by
|dL/dW| (rigl) or at random (set), new weights at zero, drop_fraction decaying on a cosine; with
`ablate` the ablation is decided again at every update from weights and gradients, as SRigL does. The
schedule is this stage's (it owns the mask); the recovery stages read it from the layers.

A model's output head (lm_head, classifier) may be targeted: its neurons (tokens, classes) are never
ablated.

Layers become CondensedLinear / CondensedConv2d; magnitude-pruned (SparseLinear / SparseConv2d) and
already condensed layers are accepted too, and their pruned weights are never revived unless a
neuron has fewer than k of them left (then zeros fill its k slots).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compresscli.core.errors import StageError
from compresscli.codecs.base import replace_module
from compresscli.codecs import SparseConv2d, SparseLinear
from compresscli.codecs.base import CONV_ARGS
from compresscli.codecs.condensed.training import CondensedConv2d, CondensedLinear
from compresscli.codecs.condensed.codec import _Condensed
from compresscli.methods.condensed_dst import DynamicSparsity, attach
from compresscli.methods.condensed_update import neurons_kept, spread_fan_in
from compresscli.methods.cost import Workload
from compresscli.methods.mask_schedule import UpdateSchedule
from compresscli.methods.solvers.activation_stats import collect
from compresscli.methods.base import MethodConfig, SizeKnob, StageContext, leaf_layers, register_method
from compresscli.model.architecture import detect

DEFAULT_SPARSITY = 0.9


@dataclass
class CondensedConfig(MethodConfig):
    method = "condensed"
    size_knob = SizeKnob("sparsity", 0.0, 0.9999)
    sparsity: float | None = None  # fraction of each neuron's inputs removed; default 0.9, or 1 - N/M with n_m
    n_m: list[int] | None = None  # [N, M]: keep N of every M consecutive inputs (e.g. [2, 4]); None: any k inputs
    score: Literal["magnitude", "activation"] = "magnitude"  # |W|, or |W| * ||X_j|| on calibration data
    k_multiple: int = 1  # round k up to a multiple of this (4 or 8 suit vector loads), capped at the fan-in
    ablate: bool = False  # SRigL neuron ablation: drop neurons with too few salient weights, give their budget to the rest
    min_salient: float = 0.3  # with ablate: a neuron stays when at least this fraction of its k weights are salient
    # Dynamic sparse training in the recovery stages that follow (SRigL): how each neuron's inputs move.
    update: Literal["none", "rigl", "set"] = "none"  # none: fixed mask; regrow by |dL/dW| (rigl) or at random (set)
    every: int = 20  # recovery steps between mask updates
    until: float = 0.75  # fraction of each recovery stage's steps after which the mask stays fixed
    drop_fraction: float = 0.3  # fraction of the kept weights dropped and regrown at the first update, cosine-decayed

    def __post_init__(self) -> None:
        if self.n_m is not None:
            if len(self.n_m) != 2 or not 0 < self.n_m[0] < self.n_m[1]:
                raise StageError(f"n_m must be [N, M] with 0 < N < M (e.g. [2, 4]), got {self.n_m}")
            implied = 1 - self.n_m[0] / self.n_m[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise StageError(f"sparsity {self.sparsity} conflicts with n_m {self.n_m} (which means sparsity "
                                 f"{implied:g}); give only one of them")
            if self.k_multiple != 1 or self.ablate:
                raise StageError("n_m fixes where the kept inputs lie; leave k_multiple at 1 and ablate off")
            self.sparsity = implied
        if self.sparsity is None:
            self.sparsity = DEFAULT_SPARSITY
        if not 0.0 <= self.sparsity < 1.0:
            raise StageError(f"sparsity must be in [0, 1) (the fraction removed), got {self.sparsity}")
        if self.k_multiple < 1:
            raise StageError(f"k_multiple must be >= 1, got {self.k_multiple}")
        if not 0.0 < self.min_salient <= 1.0:
            raise StageError(f"min_salient must be in (0, 1], got {self.min_salient}")
        if self.every < 1:
            raise StageError(f"every must be >= 1 (recovery steps between mask updates), got {self.every}")
        if not 0.0 < self.until <= 1.0:
            raise StageError(f"until must be in (0, 1] (a fraction of the recovery steps), got {self.until}")
        if not 0.0 < self.drop_fraction < 1.0:
            raise StageError(f"drop_fraction must be in (0, 1), got {self.drop_fraction}")

    def dynamic(self, head: bool) -> DynamicSparsity | None:
        """The mask schedule the recovery stages run for a layer of this stage (None: the mask stays).
        An output head's neurons are tokens or classes: never ablated."""
        if self.update == "none":
            return None
        return DynamicSparsity(self.update, UpdateSchedule(self.every, self.until, self.drop_fraction),
                               self.min_salient if self.ablate and not head else None,
                               tuple(self.n_m) if self.n_m else None, self.k_multiple)

    def sweep_recovery(self, steps: int, lr: float) -> tuple[dict[str, Any], int]:
        """With recovery steps, the mask keeps learning (rigl), about ten updates before `until`."""
        if steps == 0:
            return {}, steps
        return {"update": "rigl", "every": max(1, round(self.until * steps / 10))}, steps

    def needs_data(self) -> bool:
        return self.score == "activation"

    def resident_bytes(self, work: Workload) -> int:
        return int((1 - self.sparsity) * work.weights * (work.value_bytes + 2)) - work.weights * work.value_bytes

    def working_bytes(self, work: Workload) -> int:
        """New values and int16 indices beside the dense layers, and the largest layer's float scores and
        per-row top-k."""
        kept = (1 - self.sparsity) * work.weights
        return int(kept * (work.value_bytes + 2) + work.largest_layer * (4 + 12 * (1 - self.sparsity)))


LAYER_TYPES = (nn.Linear, nn.Conv2d, _Condensed)


def condensable_layers(selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
    layers = leaf_layers(selected, LAYER_TYPES, "Linear or Conv2d layer")
    for name, layer in layers.items():
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise StageError(f"{name}: condensed supports zero-padded convolutions only "
                             f"(padding_mode={layer.padding_mode!r})")
    return layers


def dense_view(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as out x fan_in, kept mask or None): pruned entries of sparse/condensed layers are zero."""
    with torch.no_grad():
        if isinstance(layer, _Condensed):
            weight, mask = layer.dense_weight(), layer.mask()
        elif isinstance(layer, (SparseLinear, SparseConv2d)):
            weight, mask = layer.dense_weight(), layer.mask
        else:
            weight, mask = layer.weight, None
        rows = weight.shape[0]
        return weight.detach().reshape(rows, -1), None if mask is None else mask.reshape(rows, -1)


def fan_in_k(fan_in: int, config: CondensedConfig) -> int:
    """k = round((1 - s) * fan_in), at least 1, rounded up to k_multiple, at most fan_in."""
    k = max(1, round((1 - config.sparsity) * fan_in))
    return min(fan_in, math.ceil(k / config.k_multiple) * config.k_multiple)


def top_k_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row top-k column ids (rows x k), sorted ascending so reads walk the input in order."""
    return torch.topk(score, k, dim=1).indices.sort(dim=1).values


def n_m_indices(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The top n of every group of m consecutive inputs, per row (rows x fan_in * n / m), sorted."""
    rows, fan_in = score.shape
    if fan_in % m:
        raise StageError(f"n_m {n}:{m} needs a fan-in divisible by {m}, a layer has {fan_in}")
    within = torch.topk(score.view(rows, fan_in // m, m), n, dim=2).indices  # (rows, groups, n)
    base = torch.arange(0, fan_in, m, device=score.device).view(1, -1, 1)
    return (within + base).view(rows, -1).sort(dim=1).values


def neurons_to_keep(score: torch.Tensor, k: int, config: CondensedConfig) -> torch.Tensor | None:
    """SRigL ablation: ids of the neurons that stay (None: all of them).

    Salient = the layer's top rows*k scores. A neuron with fewer than max(1, min_salient * k) salient
    weights is ablated, but at least ceil(rows * k / fan_in) neurons stay so the redistributed fan-in
    fits; among the ablation candidates, the most salient are spared first.
    """
    rows, fan_in = score.shape
    budget = rows * k
    salient = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    salient[torch.topk(score.reshape(-1), budget, sorted=False).indices] = True
    counts = salient.view(rows, fan_in).sum(1)  # (rows,)
    keep = neurons_kept(counts, max(1, int(config.min_salient * k)), math.ceil(budget / fan_in),
                        score.clamp_min(0).sum(1))
    return None if bool(keep.all()) else keep.nonzero().view(-1)


def activation_norms(model: nn.Module, layers: dict[str, nn.Module], ctx: StageContext) -> dict[str, torch.Tensor]:
    """||X_j||_2 over every calibration token/position, per layer, shaped like the layer's weight rows
    (out x fan_in; for a grouped conv each output channel sees its group's inputs)."""
    if ctx.calibrator is None:
        raise StageError("score activation needs calibration data, but none was given (pass --data)")
    stats = collect(model, layers, ctx.calibrator)
    norms = {}
    for name, layer in layers.items():
        rows, groups = dense_view(layer)[0].shape[0], getattr(layer, "groups", 1)
        per_group = stats[name].norms().view(groups, -1)  # (groups, fan_in)
        norms[name] = per_group.repeat_interleave(rows // groups, dim=0)  # (rows, fan_in)
    return norms


def condense(layer: nn.Module, config: CondensedConfig, norms: torch.Tensor | None, head: bool = False) -> _Condensed:
    """The condensed replacement of one layer (the layer itself is left untouched); a head is never ablated."""
    weight, mask = dense_view(layer)  # (rows, fan_in)
    rows, fan_in = weight.shape
    score = weight.abs().float() if norms is None else weight.abs().float() * norms.to(weight.device)
    if mask is not None:
        score = torch.where(mask, score, torch.full_like(score, -1.0))  # pruned weights rank last
    kept = None
    if config.n_m is not None:
        indices = n_m_indices(score, *config.n_m)
    else:
        k = fan_in_k(fan_in, config)
        if config.ablate and not head:
            kept = neurons_to_keep(score, k, config)
        if kept is not None:
            k = spread_fan_in(rows * k, kept.numel(), fan_in, config.k_multiple)
            score = score[kept]
        indices = top_k_indices(score, k)
    values = (weight if kept is None else weight[kept]).gather(1, indices)
    bias = layer.bias.detach() if layer.bias is not None else None
    if isinstance(layer, (nn.Conv2d, CondensedConv2d)):
        conv = {name: getattr(layer, name) for name in CONV_ARGS}
        return CondensedConv2d(**conv, values=values, indices=indices, rows=kept, bias=bias)
    return CondensedLinear(layer.in_features, layer.out_features, values, indices, rows=kept, bias=bias)


@register_method(CondensedConfig, "constant fan-in sparsity (N:M as a special case), stored as values + int16 indices, "
                                  "with fast CPU / Triton kernels")
def condensed(model: nn.Module, selected: dict[str, nn.Module], config: CondensedConfig,
              ctx: StageContext) -> dict[str, Any]:
    layers = condensable_layers(selected)
    norms = activation_norms(model, layers, ctx) if config.score == "activation" else {}
    heads = set(detect(model).groups["head"])
    ks, ablated, total, kept = {}, {}, 0, 0
    for name, layer in layers.items():
        new = condense(layer, config, norms.get(name), head=name in heads)
        settings = config.dynamic(head=name in heads)
        if settings is not None:
            attach(new, settings)
        replace_module(model, name, new)
        ks[name] = new.k
        ablated[name] = new.out_features - new.values.shape[0]
        total += new.out_features * new.fan_in
        kept += new.values.numel()
    return {"layers": len(layers), "weights": total, "kept": kept, "sparsity": 1 - kept / total,
            "score": config.score, "n_m": config.n_m, "k": ks, "ablated_neurons": sum(ablated.values()),
            "ablated_per_layer": {n: a for n, a in ablated.items() if a}, "mask_update": config.update}
