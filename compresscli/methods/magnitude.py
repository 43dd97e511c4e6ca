"""Unstructured magnitude pruning, global or per layer, into SparseLinear / SparseConv2d."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..export import replace_module
from ..modules import SparseConv2d, SparseLinear
from .base import MethodConfig, StageContext, leaf_layers, register_method

PRUNABLE = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


@dataclass
class MagnitudeConfig(MethodConfig):
    method = "magnitude"
    sparsity: float = 0.5  # fraction of the targeted weights removed
    scope: Literal["global", "layer"] = "global"  # one threshold over all targets, or the same fraction per layer
    format: Literal["auto", "bitmask", "csr"] = "auto"  # storage; auto takes whichever is smaller on disk

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (the fraction removed), got {self.sparsity}")


def prunable_layers(selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
    layers = leaf_layers(selected, tuple(PRUNABLE))
    if not layers:
        kinds = sorted({type(m).__name__ for m in selected.values()})
        raise ValueError(f"the targets select no Linear or Conv2d layer (they select {', '.join(kinds)})")
    return layers


def keep_masks(weights: dict[str, torch.Tensor], current: dict[str, torch.Tensor], sparsity: float,
               scope: str) -> dict[str, torch.Tensor]:
    """Masks keeping the largest |w|; already-pruned weights rank below every kept one."""
    scores = {n: torch.where(current[n], w.detach().abs().float(), torch.full_like(w, -1.0, dtype=torch.float32))
              for n, w in weights.items()}
    if scope == "layer":
        return {n: _top_mask(s, round((1 - sparsity) * s.numel())) for n, s in scores.items()}
    flat = torch.cat([s.reshape(-1).cpu() for s in scores.values()])
    keep = _top_mask(flat, round((1 - sparsity) * flat.numel()))
    masks, start = {}, 0
    for n, s in scores.items():
        masks[n] = keep[start:start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return masks


def _top_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        mask[torch.topk(scores.reshape(-1), n_keep, sorted=False).indices] = True
    return mask.view(scores.shape)


def apply_masks(model: nn.Module, layers: dict[str, nn.Module], masks: dict[str, torch.Tensor], fmt: str) -> None:
    """Swap each layer for its sparse type (or update the mask of one that already is)."""
    for name, layer in layers.items():
        if isinstance(layer, (SparseLinear, SparseConv2d)):
            layer.mask.copy_(masks[name])
            with torch.no_grad():
                layer.weight.mul_(layer.mask)
            sparse = layer
        else:
            sparse = PRUNABLE[type(layer)].from_dense(layer, masks[name])
            replace_module(model, name, sparse)
        sparse.storage_format = fmt


def current_masks(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Pruning again prunes further: the existing masks of sparse layers are respected."""
    return {n: m.mask if isinstance(m, (SparseLinear, SparseConv2d)) else torch.ones_like(m.weight, dtype=torch.bool)
            for n, m in layers.items()}


@register_method(MagnitudeConfig, "unstructured magnitude pruning (global or per layer), stored as values + bitmask/CSR")
def magnitude(model: nn.Module, selected: dict[str, nn.Module], config: MagnitudeConfig,
              ctx: StageContext) -> dict[str, Any]:
    layers = prunable_layers(selected)
    masks = keep_masks({n: m.weight for n, m in layers.items()}, current_masks(layers), config.sparsity, config.scope)
    apply_masks(model, layers, masks, config.format)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    per_layer = {n: round(1 - float(m.float().mean()), 4) for n, m in masks.items()}
    return {"layers": len(layers), "weights": total, "kept": kept, "sparsity": 1 - kept / total,
            "layer_sparsity": per_layer}
