"""Unstructured pruning, global or per layer, into SparseLinear / SparseConv2d.

The method is named for its default score; `score` picks magnitude, SNIP, SynFlow or GraSP (see
scores.py), each applied one-shot except SynFlow, which prunes over `rounds` rounds on the
exponential schedule 1 - (1 - s)^(k / rounds) as its paper prescribes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compresscli.model.architecture import block_names_of
from compresscli.core.errors import StageError
from compresscli.codecs.base import replace_module
from compresscli.codecs import SparseConv2d, SparseLinear
from compresscli.methods import scores as S
from compresscli.methods.cost import Workload
from compresscli.methods.base import MethodConfig, SizeKnob, StageContext, leaf_layers, register_method

PRUNABLE = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


@dataclass
class MagnitudeConfig(MethodConfig):
    method = "magnitude"
    block_by_block_params = {"scope": "block"}
    size_knob = SizeKnob("sparsity", 0.0, 0.9999)
    sweep_variants = {"magnitude": {"score": "magnitude"}, "snip": {"score": "snip"}, "synflow": {"score": "synflow"},
                      "grasp": {"score": "grasp"}}
    sparsity: float = 0.5  # fraction of the targeted weights removed
    scope: Literal["global", "block", "layer"] = "global"  # one threshold over all targets, one per block, or the same fraction per layer
    score: Literal["magnitude", "snip", "synflow", "grasp"] = "magnitude"  # which weights matter (see scores.py)
    rounds: int = 100  # synflow only: pruning rounds on an exponential schedule
    format: Literal["auto", "bitmask", "csr"] = "auto"  # storage; auto takes whichever is smaller on disk

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise StageError(f"sparsity must be in [0, 1) (the fraction removed), got {self.sparsity}")
        if self.rounds < 1:
            raise StageError(f"rounds must be >= 1, got {self.rounds}")

    def needs_data(self) -> bool:
        return self.score != "magnitude"

    def working_bytes(self, work: Workload) -> int:
        """The ranking: float scores, their flat copy and top-k values and int64 indices, over all
        targets (global), a block's (block) or the largest layer's (layer); the masks themselves are
        resident_bytes. Pruned layers take over the dense weights, so no weight is copied; gradient
        scores add a backward pass."""
        ranked = {"global": work.weights, "block": work.weights // max(1, work.blocks), "layer": work.largest_layer}
        ranking = int(ranked[self.scope] * (9 + 12 * (1 - self.sparsity)))
        gradients = 0
        if self.score in ("snip", "grasp"):
            gradients = work.model_bytes + work.activations() * (2 if self.score == "grasp" else 1)
        elif self.score == "synflow":  # a float64 copy of the model, and its gradients
            gradients = 2 * work.model_bytes * 8 // work.value_bytes
        return ranking + gradients

    def resident_bytes(self, work: Workload) -> int:
        return work.weights  # a bool mask beside each dense weight

    def whole_model_only(self) -> str | None:
        if self.score != "magnitude":
            return f"score {self.score} needs gradients through the whole model; use score: magnitude"
        if self.scope == "global":
            return ("scope global ranks every targeted weight together; use scope: block (one threshold per "
                    "block) or scope: layer")
        return None


def prunable_layers(selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
    return leaf_layers(selected, tuple(PRUNABLE), "Linear or Conv2d layer")


def scope_groups(names: list[str], scope: str, block_of: dict[str, str] | None = None) -> list[list[str]]:
    """The layers that share one threshold: all of them ("global"), each block's ("block": `block_of`
    names each layer's block), or each layer alone ("layer")."""
    if scope == "global":
        return [list(names)]
    if scope == "layer":
        return [[name] for name in names]
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault((block_of or {}).get(name, name), []).append(name)
    return list(groups.values())


def keep_masks(scores: dict[str, torch.Tensor], current: dict[str, torch.Tensor], sparsity: float,
               scope: str, block_of: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Masks keeping the highest scores, one threshold per scope group (see scope_groups). Already-pruned
    weights rank below every kept one and are never revived, so asking for less sparsity than there is
    leaves the masks as they are."""
    masks = {}
    for names in scope_groups(list(scores), scope, block_of):
        ranked = {n: torch.where(current[n], scores[n].float(), torch.full_like(scores[n], -torch.inf,
                                                                                dtype=torch.float32))
                  for n in names}
        if len(ranked) == 1:
            (name, s), = ranked.items()
            masks[name] = _top_mask(s, round((1 - sparsity) * s.numel())) & current[name]
            continue
        flat = torch.cat([s.reshape(-1).cpu() for s in ranked.values()])
        keep = _top_mask(flat, round((1 - sparsity) * flat.numel()))
        start = 0
        for n, s in ranked.items():
            masks[n] = keep[start:start + s.numel()].view(s.shape).to(s.device) & current[n]
            start += s.numel()
    return masks


def _top_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        mask[torch.topk(scores.reshape(-1), n_keep, sorted=False).indices] = True
    return mask.view(scores.shape)


def apply_masks(model: nn.Module, layers: dict[str, nn.Module], masks: dict[str, torch.Tensor],
                fmt: str = "auto") -> dict[str, nn.Module]:
    """Swap each layer for its sparse type (or update the mask of one that already is); returns them.
    A new sparse layer takes over the dense layer's weight, unless that weight is tied to another module
    (an LM head tied to the embedding), which must keep its own."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    sparse_layers = {}
    for name, layer in layers.items():
        if isinstance(layer, (SparseLinear, SparseConv2d)):
            layer.mask.copy_(masks[name])
            with torch.no_grad():
                layer.weight.mul_(layer.mask)
            sparse = layer
        else:
            if uses.get(id(layer.weight), 0) > 1:
                layer.weight = nn.Parameter(layer.weight.detach().clone())
            sparse = PRUNABLE[type(layer)].from_dense(layer, masks[name])
            replace_module(model, name, sparse)
        sparse.storage_format = fmt
        sparse_layers[name] = sparse
    return sparse_layers


def current_masks(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Pruning again prunes further: the existing masks of sparse layers are respected."""
    return {n: m.mask if isinstance(m, (SparseLinear, SparseConv2d)) else torch.ones_like(m.weight, dtype=torch.bool)
            for n, m in layers.items()}


def score_layers(model: nn.Module, layers: dict[str, nn.Module], score: str, ctx: StageContext) -> S.Scores:
    if score == "magnitude":
        return S.magnitude_scores(layers)
    if not ctx.calibration:
        raise StageError(f"score {score} needs calibration data, but none was given (pass --data)")
    if score == "synflow":
        return S.synflow_scores(model, layers, S.ones_like_batch(ctx.calibration[0]), ctx.task)
    scorer = S.snip_scores if score == "snip" else S.grasp_scores
    return scorer(model, layers, ctx.task, ctx.calibration, ctx.device)


def prune(model: nn.Module, layers: dict[str, nn.Module], config: MagnitudeConfig,
          ctx: StageContext) -> dict[str, nn.Module]:
    """Prune `layers` of `model` to `config.sparsity`; returns the sparse layers by name."""
    block_of = block_names_of(model, list(layers)) if config.scope == "block" else None
    if config.score == "magnitude":  # one scope group at a time: never a score for every weight at once
        pruned = {}
        for names in scope_groups(list(layers), config.scope, block_of):
            group = {n: layers[n] for n in names}
            masks = keep_masks(S.magnitude_scores(group), current_masks(group), config.sparsity, "global")
            pruned.update(apply_masks(model, group, masks, config.format))
        return pruned
    rounds = config.rounds if config.score == "synflow" else 1
    for k in range(1, rounds + 1):
        target = 1 - (1 - config.sparsity) ** (k / rounds)  # exponential schedule of the kept fraction
        scores = score_layers(model, layers, config.score, ctx)
        layers = apply_masks(model, layers, keep_masks(scores, current_masks(layers), target, config.scope, block_of),
                             config.format)
    return layers


@register_method(MagnitudeConfig, "unstructured pruning by magnitude / SNIP / SynFlow / GraSP scores, stored as values + bitmask or CSR")
def magnitude(model: nn.Module, selected: dict[str, nn.Module], config: MagnitudeConfig,
              ctx: StageContext) -> dict[str, Any]:
    layers = prune(model, prunable_layers(selected), config, ctx)
    masks = current_masks(layers)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    per_layer = {n: round(1 - float(m.float().mean()), 4) for n, m in masks.items()}
    return {"layers": len(layers), "weights": total, "kept": kept, "sparsity": 1 - kept / total,
            "score": config.score, "layer_sparsity": per_layer}
