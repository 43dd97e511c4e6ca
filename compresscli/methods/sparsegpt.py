"""`sparsegpt`: one-shot pruning with the OBS solver of SparseGPT (Frantar & Alistarh 2023; obs.py),
from calibration data, no training. Unstructured (each column block at `sparsity`), N:M, or constant
fan-in stored in the condensed format (`format: condensed`: every row keeps exactly
k = round((1 - s) * in) inputs and runs on the condensed kernel). `scope: global` spends one
threshold of the OBS costs over all targets to set each layer's sparsity first (the layers then
solve in order as usual), so sensitive layers keep more. With `bits`, the kept weights are quantized in the
same sweep (the SparseGPT paper's joint mode: each weight rounded to its grid when its column is reached, its
error compensated like a pruning error) and stored on that grid (codecs/quant).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compresscli.codecs.quant.grid import QuantSpec
from compresscli.core.errors import StageError
from compresscli.methods.cost import Workload
from compresscli.methods.solvers.activation_stats import collect, forward_groups
from compresscli.methods.base import MethodConfig, SizeKnob, StageContext, register_method
from compresscli.methods.solvers.column_grid import ColumnGrid
from compresscli.methods.solvers.obs import MaskSpec, inverse_cholesky, sparsegpt
from compresscli.methods.solvers.one_shot import check_fan_ins, check_n_m, linear_targets, prior_keep, prune_in_order


@dataclass
class SparseGPTConfig(MethodConfig):
    method = "sparsegpt"
    size_knob = SizeKnob("sparsity", 0.0, 0.9999)
    storage_like = "magnitude"
    prefers_block_by_block = True
    sparsity: float = 0.5  # fraction of the targeted weights removed
    n_m: list[int] | None = None  # [N, M]: keep N of every M consecutive inputs (e.g. [2, 4])
    format: Literal["auto", "bitmask", "csr", "condensed"] = "auto"  # condensed: constant fan-in, condensed kernel
    scope: Literal["layer", "global"] = "layer"  # each layer at `sparsity`, or per-layer sparsities from one threshold
    blocksize: int = 128  # columns solved together (the mask is chosen per block)
    percdamp: float = 0.01  # damping of H, as a fraction of mean(diag H); raised x10 on Cholesky failure
    bits: int | None = None  # also quantize the kept weights in the same sweep: 8, 4, 3 or 2 (null: floats)
    group_size: int | None = 128  # with bits: inputs per scale; null: one scale per output row
    symmetric: bool = True  # with bits: false adds an int8 zero point per scale
    clip: Literal["auto", "mse", "minmax"] = "auto"  # with bits: scales by range search (mse below 8 bits) or full range

    def __post_init__(self) -> None:
        check_n_m(self.n_m)
        if self.bits is not None:
            try:
                QuantSpec(self.bits, self.group_size, self.symmetric)
            except ValueError as err:
                raise StageError(str(err)) from None
        if self.n_m is not None:
            self.sparsity = 1 - self.n_m[0] / self.n_m[1]
            if self.scope != "layer":
                raise StageError("n_m fixes every layer's sparsity; leave scope at layer")
        if not 0.0 <= self.sparsity < 1.0:
            raise StageError(f"sparsity must be in [0, 1) (the fraction removed), got {self.sparsity}")
        if self.blocksize < 1 or not self.percdamp > 0:
            raise StageError("blocksize must be >= 1 and percdamp > 0")
        if self.format == "condensed" and self.scope == "global":
            raise StageError("format condensed keeps the same fan-in in every row of a layer; use scope: layer")

    def whole_model_only(self) -> str | None:
        if self.scope == "global":
            return "scope global sets every layer's sparsity from all targets at once; use scope: layer"
        return None

    def working_bytes(self, work: Workload) -> int:
        """The largest layer's weight in float32 (working copy, its update and error blocks) and its
        Hessian, inverse and factors (fan_in^2 float32 each); global scope keeps every weight's cost."""
        per_layer = 12 * work.largest_layer + 16 * work.fan_in * work.fan_in
        return per_layer + (4 * work.weights if self.scope == "global" else 0) + work.weights

    def resident_bytes(self, work: Workload) -> int:
        if self.bits is not None:  # the same, plus a scale mantissa and exponent per group
            return self._pruned_resident(work) + 2 * work.value_bytes * work.weights // (self.group_size or work.fan_in)
        return self._pruned_resident(work)

    def _pruned_resident(self, work: Workload) -> int:
        if self.format == "condensed":
            return int((1 - self.sparsity) * work.weights * (work.value_bytes + 2)) - work.weights * work.value_bytes
        return work.weights  # a bool mask beside each dense weight

    def spec(self, sparsity: float | None = None) -> MaskSpec:
        n_m = tuple(self.n_m) if self.n_m else None
        return MaskSpec(self.sparsity if sparsity is None else sparsity, n_m, fan_in=self.format == "condensed")


def global_sparsities(model: nn.Module, layers: dict[str, nn.Linear], ctx: StageContext,
                      config: SparseGPTConfig) -> dict[str, float]:
    """Per-layer sparsities from one threshold over every weight's OBS cost w^2 / [H^-1]_jj^2 (computed
    on the unpruned model, one group at a time, keeping only the costs)."""
    costs = {}
    for group in forward_groups(model, layers, ctx.calibrator):
        stats = collect(model, {n: layers[n] for n in group}, ctx.calibrator, True, stop_after=layers[group[-1]])
        for name in group:
            hinv = inverse_cholesky(stats[name].hessian(), config.percdamp, name)
            weight = layers[name].weight.detach().float()
            cost = weight.pow(2) / torch.diag(hinv).pow(2).unsqueeze(0)
            keep = prior_keep(layers[name])
            costs[name] = cost if keep is None else torch.where(keep, cost, torch.full_like(cost, -1.0))
        del stats
    flat = torch.cat([c.flatten() for c in costs.values()])
    drop = int(flat.numel() * config.sparsity)
    threshold = torch.kthvalue(flat, drop).values if drop else flat.min() - 1
    return {name: float((cost <= threshold).float().mean()) for name, cost in costs.items()}


@register_method(SparseGPTConfig, "one-shot OBS pruning from calibration data (SparseGPT): unstructured, N:M or "
                                  "constant fan-in into the condensed format")
def sparsegpt_stage(model: nn.Module, selected: dict[str, nn.Module], config: SparseGPTConfig,
                    ctx: StageContext) -> dict[str, Any]:
    layers = linear_targets(selected)
    check_fan_ins(layers, config.n_m)
    unit = config.n_m[1] if config.n_m else 1
    if config.scope == "global":
        if ctx.calibrator is None:
            raise StageError("sparsegpt needs calibration data, but none was given (pass --data)")
        sparsity = global_sparsities(model, layers, ctx, config)
    else:
        sparsity = {name: config.sparsity for name in layers}

    def solve(name: str, layer: nn.Linear, stats):
        grid = None
        if config.bits is not None:
            dtype = layer.weight.dtype if layer.weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
            grid = ColumnGrid(QuantSpec(config.bits, config.group_size, config.symmetric), *layer.weight.shape, dtype,
                              ("mse" if config.bits < 8 else "minmax") if config.clip == "auto" else config.clip,
                              layer.weight.device)
        blocksize = grid.blocksize(config.blocksize, unit) if grid else max(config.blocksize // unit, 1) * unit
        weight, keep = sparsegpt(layer.weight, stats.hessian(), config.spec(sparsity[name]), prior_keep(layer),
                                 blocksize, config.percdamp, name, grid)
        return weight, keep, None if grid is None else grid.quantizer()

    stats = prune_in_order(model, layers, ctx, solve, config.format, keep_gram=True)
    quant = {} if config.bits is None else {"bits": config.bits, "group_size": config.group_size,
                                            "symmetric": config.symmetric}
    return {**stats, "scope": config.scope, "n_m": config.n_m, "format": config.format, **quant}
