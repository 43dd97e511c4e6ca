"""The driver the calibration-driven one-shot pruners share (SparseGPT, Wanda): layers are solved
group by group in the order the forward reaches them (layers reading the same input together), each
group's statistics gathered with the layers before it already pruned, so their error is seen and
compensated downstream (the papers' sequential mode; in the block-by-block engine the calibrator
only runs the current block). Results become SparseLinear layers (values + bitmask/CSR) or, for a
constant fan-in, CondensedLinear layers that run on the condensed kernel; a solver that also quantized the
kept weights (SparseGPT's joint mode) gives their grid, and the layer stores its values on it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from compresscli.core.errors import StageError
from compresscli.codecs.base import replace_module
from compresscli.codecs import SparseLinear
from compresscli.codecs.condensed.training import CondensedLinear
from compresscli.codecs.quant.values import Quantizer
from compresscli.methods.solvers.activation_stats import InputStats, collect, forward_groups
from compresscli.methods.base import StageContext, leaf_layers

# (layer name, layer, its input statistics) -> (pruned weight, keep mask, the grid it is on or None)
Solver = Callable[[str, nn.Linear, InputStats], tuple[torch.Tensor, torch.Tensor, Quantizer | None]]


def linear_targets(selected: dict[str, nn.Module]) -> dict[str, nn.Linear]:
    """The selected Linear layers (already magnitude-pruned ones included)."""
    return leaf_layers(selected, (nn.Linear,), "Linear layer")


def check_n_m(n_m: list[int] | None) -> None:
    """A config's `n_m`, if given, is [N, M] with 0 < N < M."""
    if n_m is not None and (len(n_m) != 2 or not 0 < n_m[0] < n_m[1]):
        raise StageError(f"n_m must be [N, M] with 0 < N < M (e.g. [2, 4]), got {n_m}")


def check_fan_ins(layers: dict[str, nn.Linear], n_m: list[int] | None) -> None:
    """N:M groups need every targeted fan-in divisible by M; the error names the first layer that is not."""
    if n_m is None:
        return
    bad = [n for n, layer in layers.items() if layer.in_features % n_m[1]]
    if bad:
        raise StageError(f"n_m {n_m[0]}:{n_m[1]} needs fan-ins divisible by {n_m[1]}; {bad[0]} has "
                         f"{layers[bad[0]].in_features}")


def prior_keep(layer: nn.Linear) -> torch.Tensor | None:
    """What an earlier pruning stage kept (None: everything)."""
    return layer.mask if isinstance(layer, SparseLinear) else None


def pruned_layer(layer: nn.Linear, weight: torch.Tensor, keep: torch.Tensor, storage: str) -> nn.Module:
    """`layer` with its pruned weight: condensed (every row keeps the same count) or sparse."""
    weight = weight.to(layer.weight.dtype)
    if storage == "condensed":  # rows that kept fewer (pruned before) fill their slots with zeros
        k = int(keep.sum(1).max())
        indices = torch.argsort(keep.to(torch.int8), dim=1, descending=True, stable=True)[:, :k]
        indices = indices.sort(dim=1).values  # (rows, k): reads walk the input in order
        values = (weight * keep).gather(1, indices)
        bias = layer.bias.detach() if layer.bias is not None else None
        return CondensedLinear(layer.in_features, layer.out_features, values, indices, bias=bias)
    with torch.no_grad():
        layer.weight.data = weight
    if isinstance(layer, SparseLinear):
        layer.mask.copy_(keep)
        sparse = layer
    else:
        sparse = SparseLinear.from_dense(layer, keep)
    sparse.storage_format = storage
    return sparse


def prune_in_order(model: nn.Module, layers: dict[str, nn.Linear], ctx: StageContext, solve: Solver,
                   storage: str, keep_gram: bool) -> dict[str, Any]:
    """Solve every layer group by group (see the module docstring); per-layer sparsity in the stats."""
    if ctx.calibrator is None:
        raise StageError("this method needs calibration data, but none was given (pass --data)")
    sparsity = {}
    with ctx.progress.task("one-shot pruning", total=len(layers)) as bar:
        for group in forward_groups(model, layers, ctx.calibrator):
            stats = collect(model, {n: layers[n] for n in group}, ctx.calibrator, keep_gram,
                            stop_after=layers[group[-1]])
            for name in group:
                weight, keep, quantizer = solve(name, layers[name], stats[name])
                pruned = pruned_layer(layers[name], weight, keep, storage)
                if quantizer is not None:
                    pruned.quantize_values_(quantizer, weight)
                replace_module(model, name, pruned)
                sparsity[name] = round(1 - keep.float().mean().item(), 4)
                bar.advance(1)
            del stats
    total = sum(layers[n].weight.numel() for n in layers)
    kept = sum((1 - sparsity[n]) * layers[n].weight.numel() for n in layers)
    return {"layers": len(layers), "weights": total, "sparsity": round(1 - kept / total, 4), "layer_sparsity": sparsity}
