"""The quantization grid of one layer as the OBS column sweep (obs.py) reaches it: GPTQ (Frantar et al. 2023),
and SparseGPT's joint prune-and-quantize mode, are that sweep with each kept weight also rounded to the grid
when its column comes, the rounding error propagated to the later columns like a pruning error.

Per-row grids take their scales from the whole weight before the sweep (as the reference implementation
does). Per-group grids take a group's scales when the sweep reaches its first column, from the group's
current values (already updated for the errors of the columns before it, pruned ones at 0): measured on
MiniLM, scales fixed from the original weight ("static groups", llm-compressor's way) cost 9% more output
error at int3 g128 and 25% more at int2 g64. The sweep's column blocks are a multiple of the group size, so
a group never straddles two blocks and its current values are all in the block being swept.
"""
from __future__ import annotations

import math

import torch

from compresscli.codecs.quant import grid
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import Quantizer


class ColumnGrid:
    """Scales, zero points and codes of a (rows, cols) weight, filled column by column by the sweep."""

    def __init__(self, spec: QuantSpec, rows: int, cols: int, scale_dtype: torch.dtype, clip: str,
                 device: torch.device | None = None):
        self.spec, self.cols, self.scale_dtype, self.clip = spec, cols, scale_dtype, clip
        self.group = spec.group(cols)
        groups = spec.groups(cols)
        self.scales = torch.ones(rows, groups, device=device)  # float32, holding values of scale_dtype
        self.zeros = torch.zeros(rows, groups, device=device)
        self.codes = torch.zeros(rows, cols, dtype=torch.int8, device=device)

    def blocksize(self, blocksize: int, unit: int = 1) -> int:
        """`blocksize` rounded down (to at least one unit) to a multiple of the group and of `unit` (N:M's M)."""
        step = math.lcm(unit, self.group if self.spec.group_size is not None else 1)
        return max(blocksize // step, 1) * step

    def start(self, weight: torch.Tensor, keep: torch.Tensor) -> None:
        """Before the sweep: per-row scales from the whole (kept) weight."""
        if self.spec.group_size is None:
            self.scales[:, 0], self.zeros[:, 0] = grid.choose_scales(weight * keep, self.spec, self.scale_dtype,
                                                                     self.clip)

    def round(self, col: int, values: torch.Tensor, rest: torch.Tensor, pruned_rest: torch.Tensor) -> torch.Tensor:
        """Column `col`'s values (rows,) on the grid, 0 where pruned (`pruned_rest[:, 0]`); `rest` and
        `pruned_rest` are the block's current values and pruning from this column on (a new group's scales
        are chosen from them)."""
        j = col // self.group
        if self.spec.group_size is not None and col % self.group == 0:
            current = rest[:, :self.group].masked_fill(pruned_rest[:, :self.group], 0)
            self.scales[:, j], self.zeros[:, j] = grid.choose_scales(current, self.spec, self.scale_dtype, self.clip)
        scale, zero = self.scales[:, j], self.zeros[:, j]
        codes = torch.round(grid.grid_position(values, scale, zero, self.spec))
        codes = torch.where(pruned_rest[:, 0], zero, codes)  # a pruned weight: code z, exactly 0.0
        self.codes[:, col] = codes.to(torch.int8)
        return (codes - zero).to(values.dtype) * scale.to(values.dtype)  # exact in float64 (the tests' references)

    def quantizer(self) -> Quantizer:
        """The training form's quantizer for the values the sweep produced."""
        zeros = None if self.spec.symmetric else self.zeros.to(torch.int8)
        return Quantizer(self.spec, self.scales.to(self.scale_dtype), zeros, self.cols)
