"""`quantize`: the targeted layers' stored values on an integer grid of 8, 4, 3 or 2 bits (codecs/quant), alone or
after any other method, keeping that method's structure: a dense Linear becomes a quantized_linear layer; a
sparse layer keeps its mask, a condensed one its fan-in and indices, a FiPS layer its shared base and sparse
factor (both quantized), an RPS layer its placement (its shared memory quantized).

solver gptq: the OBS column sweep SparseGPT uses (solvers/obs.py with a solvers/column_grid.py grid), from the
same Hessian of the layer's inputs on calibration data, layers solved in forward order so each sees the
quantized layers before it; weights a previous stage pruned stay pruned. It applies to weights that multiply
the layer's input (dense, sparse, condensed); FiPS factors and RPS memories are not, so they are rounded to
nearest whatever the solver (`sequential: false` gathers every layer's statistics in one pass, from the
inputs the unit has before any of its layers is quantized). solver rtn: round to nearest, no data. `clip: auto` searches each group's range
(mse) below 8 bits and takes the full range at 8 (research notes: the search halves int2's error; at int8 it
does not help).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compresscli.codecs.base import CompressedModule, replace_module
from compresscli.codecs.condensed.codec import _Condensed
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import Quantizer
from compresscli.codecs.quantized_linear.training import QuantizedLinear
from compresscli.core.errors import StageError
from compresscli.methods.base import MethodConfig, StageContext, leaf_layers, register_method
from compresscli.methods.cost import Workload
from compresscli.methods.solvers.activation_stats import collect, forward_groups
from compresscli.methods.solvers.column_grid import ColumnGrid
from compresscli.methods.solvers.obs import MaskSpec, sparsegpt


@dataclass
class QuantizeConfig(MethodConfig):
    method = "quantize"
    prefers_block_by_block = True  # GPTQ calibrates layer by layer inside each block, as SparseGPT does
    bits: int = 4  # 8, 4, 3 or 2
    group_size: int | None = 128  # inputs per scale; null: one scale per output row
    symmetric: bool = True  # false: an int8 zero point per scale
    solver: Literal["gptq", "rtn"] = "gptq"  # gptq: OBS sweep on calibration data; rtn: round to nearest, no data
    clip: Literal["auto", "mse", "minmax"] = "auto"  # scales: range search (mse), the full range, or auto
    sequential: bool = True  # gptq: each layer group's inputs from the layers before it already quantized;
    # false: every layer's from one calibration pass over the unit (as llm-compressor's GPTQ does: fewer passes)
    blocksize: int = 128  # gptq: columns solved together (rounded to a multiple of group_size)
    percdamp: float = 0.01  # gptq: damping of H, as a fraction of mean(diag H)

    def __post_init__(self) -> None:
        try:
            QuantSpec(self.bits, self.group_size, self.symmetric)
        except ValueError as err:
            raise StageError(str(err)) from None
        if self.solver not in ("gptq", "rtn"):
            raise StageError(f"solver must be gptq or rtn, got {self.solver!r}")
        if self.clip not in ("auto", "mse", "minmax"):
            raise StageError(f"clip must be auto, mse or minmax, got {self.clip!r}")
        if self.blocksize < 1 or not self.percdamp > 0:
            raise StageError("blocksize must be >= 1 and percdamp > 0")

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)

    def clip_rule(self) -> str:
        return ("mse" if self.bits < 8 else "minmax") if self.clip == "auto" else self.clip

    def needs_data(self) -> bool:
        return self.solver == "gptq"

    def working_bytes(self, work: Workload) -> int:
        """gptq: the largest layer's weight in float32 (working copy, update and error blocks), its codes, and its
        Hessian, inverse and factors (fan_in^2 float32 each); rtn: the largest layer's range search (float32
        copies of the weight, its codes and errors)."""
        if self.solver == "gptq":
            return 13 * work.largest_layer + 16 * work.fan_in * work.fan_in
        return 16 * work.largest_layer

    def resident_bytes(self, work: Workload) -> int:
        """The training form keeps the float weights (the shadow) and adds a scale mantissa and exponent per group."""
        return 2 * work.value_bytes * work.weights // (self.group_size or max(1, work.fan_in))


def _takes_hessian(layer: nn.Module) -> bool:
    """Whether the layer's quantizable values multiply its input (their columns are its input channels)."""
    return isinstance(layer, (nn.Linear, nn.Conv2d, _Condensed))


def quantizable_layers(selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The selected dense Linear layers and compressed layers; a selected dense layer of another kind is an error."""
    layers = leaf_layers(selected, (nn.Linear, CompressedModule), "Linear or compressed layer")
    other = [n for n, m in selected.items() if not isinstance(m, (nn.Linear, CompressedModule))
             and not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False))]
    if other:
        raise StageError(f"quantize stores dense Linear layers and compressed layers; {other[0]} is a dense "
                         f"{type(selected[other[0]]).__name__}", "compress it first (e.g. magnitude) or leave it "
                         "out of the targets")
    return layers


def values_of(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The values to quantize as a (rows, cols) matrix, and which entries are kept (None: all)."""
    if hasattr(layer, "quantizable_values"):
        return layer.quantizable_values()
    return layer.weight.detach(), None


def install(model: nn.Module, name: str, layer: nn.Module, quantizer: Quantizer, values: torch.Tensor) -> None:
    """`layer` storing `values` (on `quantizer`'s grid) from now on: a dense Linear becomes a QuantizedLinear."""
    if hasattr(layer, "quantize_values_"):
        layer.quantize_values_(quantizer, values)
    elif isinstance(layer, nn.Linear):
        replace_module(model, name, QuantizedLinear.from_dense(layer, quantizer, values))


def _scale_dtype(values: torch.Tensor) -> torch.dtype:
    return values.dtype if values.dtype in (torch.float16, torch.bfloat16) else torch.float32


def round_to_nearest(model: nn.Module, name: str, layer: nn.Module, spec: QuantSpec, clip: str) -> None:
    if hasattr(layer, "quantizable_values") or not isinstance(layer, CompressedModule):
        values, _ = values_of(layer)
        install(model, name, layer, *Quantizer.fit(values.to(_scale_dtype(values)), spec, clip))


def quantize_shared(layer: nn.Module, spec: QuantSpec, clip: str, done: dict[str, tuple[Quantizer, torch.Tensor]]) -> None:
    """The layer's shared values (a FiPS base, an RPS memory) on a grid, each once for every layer sharing it."""
    for key, values in (layer.quantizable_shared() if hasattr(layer, "quantizable_shared") else {}).items():
        if key not in done:
            done[key] = Quantizer.fit(values.to(_scale_dtype(values)), spec, clip)
        layer.quantize_shared_(key, *done[key])


def gptq(layer: nn.Module, hessian: torch.Tensor, config: QuantizeConfig, name: str) -> tuple[Quantizer, torch.Tensor]:
    """GPTQ on the layer's values: (their quantizer, the values on its grid)."""
    values, keep = values_of(layer)
    matrix = values.reshape(values.shape[0], -1)
    grid = ColumnGrid(config.spec(), *matrix.shape, _scale_dtype(values), config.clip_rule(), matrix.device)
    solved, _ = sparsegpt(matrix, hessian, MaskSpec(0.0), None if keep is None else keep.reshape(matrix.shape),
                          grid.blocksize(config.blocksize), config.percdamp, name, grid)
    return grid.quantizer(), solved.to(values.dtype).view(values.shape)


@register_method(QuantizeConfig, "values on an integer grid (8/4/3/2 bits, per row or group), by GPTQ or round to "
                                 "nearest, keeping any earlier method's structure")
def quantize_stage(model: nn.Module, selected: dict[str, nn.Module], config: QuantizeConfig,
                   ctx: StageContext) -> dict[str, Any]:
    layers = quantizable_layers(selected)
    spec, clip = config.spec(), config.clip_rule()
    calibrated = {n: m for n, m in layers.items() if config.solver == "gptq" and _takes_hessian(m)}
    if calibrated and ctx.calibrator is None:
        raise StageError("quantize with solver gptq needs calibration data, but none was given",
                         "pass --data, or use solver: rtn")
    shared: dict[str, tuple[Quantizer, torch.Tensor]] = {}
    values = sum(values_of(m)[0].numel() for m in layers.values() if hasattr(m, "quantizable_values")
                 or not isinstance(m, CompressedModule))
    with ctx.progress.task(f"quantize ({config.solver})", total=len(layers)) as bar:
        for name, layer in layers.items():
            quantize_shared(layer, spec, clip, shared)
            if name not in calibrated:
                round_to_nearest(model, name, layer, spec, clip)
                bar.advance(1)
        groups = forward_groups(model, calibrated, ctx.calibrator) if calibrated else []
        if groups and not config.sequential:  # one pass: the last layer's statistics end it
            groups = [[name for group in groups for name in group]]
        for group in groups:
            stats = collect(model, {n: calibrated[n] for n in group}, ctx.calibrator, True,
                            stop_after=calibrated[group[-1]])
            for name in group:
                install(model, name, calibrated[name], *gptq(calibrated[name], stats[name].hessian(), config, name))
                bar.advance(1)
            del stats
    return {"layers": len(layers), "values": values, "shared": sorted(shared), **spec.to_params(),
            "solver": config.solver, "clip": clip,
            "rounded_to_nearest": sorted(set(layers) - set(calibrated)) if config.solver == "gptq" else "all"}
