"""The quantization grid every codec's stored values can use: signed integer codes of 8, 4, 3 or 2 bits with a
scale (and, asymmetric, an integer zero point) per row of a matrix or per row and group of `group_size`
consecutive columns. value = (code - zero) * scale, so 0.0 is always a code and a pruned weight stays exactly 0.

A codec's values live in the coordinates of a (rows, cols) matrix: a dense weight is that matrix; a sparse
weight's values are its kept entries; condensed values (R, k) sit at columns `indices`; a FiPS factor or an
RPS memory (viewed as one row) is a matrix of its own. `expand` looks a scale up for any of these layouts.

Two rules that matter for accuracy (research notes: /work/proto/quant/notes.md):
- scales are rounded to their storage dtype (the checkpoint's float dtype) BEFORE the codes are chosen, so the
  codes are the best ones for the scale the file holds (choosing them against float32 scales and storing
  bfloat16 ones costs 1% relative error at int8);
- `clip: mse` searches each group's range shrink ratio (1, 0.99, ..., 0.21) for the smallest squared error:
  heavy-tailed weights otherwise spend the few codes of int3/int2 on their extremes (int2 g128 on MiniLM:
  relative error 0.73 -> 0.40).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BITS = (2, 3, 4, 8)
CLIPS = ("minmax", "mse")
MSE_RATIOS = [1 - i / 100 for i in range(80)]  # shrink ratios of a group's range tried by clip "mse"


@dataclass(frozen=True)
class QuantSpec:
    """How a codec's values are quantized; what the codec params record (`to_params`)."""

    bits: int
    group_size: int | None = None  # None: one scale per row
    symmetric: bool = True  # False: an int8 zero point per scale

    def __post_init__(self) -> None:
        if self.bits not in BITS or type(self.bits) is not int:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.group_size is not None and (type(self.group_size) is not int or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer or null (one scale per row), got {self.group_size!r}")
        if type(self.symmetric) is not bool:
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group(self, cols: int) -> int:
        """Columns per scale for a matrix of `cols` columns."""
        return cols if self.group_size is None else self.group_size

    def groups(self, cols: int) -> int:
        return -(-cols // self.group(cols)) if cols else 1

    def to_params(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_params(cls, params: Any) -> "QuantSpec | None":
        """The spec a codec's params record (None: values stored as floats); ValueError when damaged."""
        if params is None:
            return None
        if not isinstance(params, dict) or set(params) != {"bits", "group_size", "symmetric"}:
            raise ValueError(f"quantization params must be {{bits, group_size, symmetric}}, got {str(params)[:80]}")
        return cls(params["bits"], params["group_size"], params["symmetric"])


def _scale_for_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                     scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to scale_dtype, held in float32) and zero point (float, integer valued) for value ranges
    [lo, hi] with lo <= 0 <= hi. Symmetric: the smallest scale that clips neither extreme, using the extra
    negative code when the extreme is negative. A zero scale (an all-zero group, or an underflow) becomes 1."""
    if spec.symmetric:
        scale = torch.maximum(hi / spec.qmax, lo / spec.qmin)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
    scale = scale.to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.symmetric:
        return scale, torch.zeros_like(scale)
    return scale, torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)


def grid_position(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float,
                  spec: QuantSpec) -> torch.Tensor:
    """values / scale + zero clamped to the code range, in float32 (codes are its rounding): the one
    computation the codes, the fake quantizer and the solvers share, so they never disagree on a tie."""
    return torch.clamp(values.float() / scale + zero, spec.qmin, spec.qmax)


def choose_scales(values: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype,
                  clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point (rows,) for values (rows, n), by the value range or (clip "mse") by the
    shrink ratio of the range with the smallest squared error; both float32."""
    values = values.float()
    lo = torch.clamp(values.amin(1), max=0)
    hi = torch.clamp(values.amax(1), min=0)
    scale, zero = _scale_for_range(lo, hi, spec, scale_dtype)
    if clip == "minmax":
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    error = torch.empty_like(values)  # in place: the search is 80 passes over the weight
    for ratio in MSE_RATIOS:
        s, z = _scale_for_range(ratio * lo, ratio * hi, spec, scale_dtype)
        torch.div(values, s.unsqueeze(1), out=error)
        error.add_(z.unsqueeze(1)).round_().clamp_(spec.qmin, spec.qmax).sub_(z.unsqueeze(1)).mul_(s.unsqueeze(1))
        err = torch.linalg.vector_norm(error.sub_(values), dim=1)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def rtn(weight: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype,
        clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round to nearest: (codes int8 (rows, cols), scales (rows, groups) in scale_dtype, zeros int8 or None).
    A short last group (cols % group_size) is padded with zeros, which cost no error (0.0 is a code)."""
    rows, cols = weight.shape
    g, groups = spec.group(cols), spec.groups(cols)
    padded = torch.nn.functional.pad(weight.detach().float(), (0, groups * g - cols)).view(rows * groups, g)
    scale, zero = choose_scales(padded, spec, scale_dtype, clip)
    codes = torch.round(grid_position(padded, scale.unsqueeze(1), zero.unsqueeze(1), spec))
    codes = codes.view(rows, groups * g)[:, :cols].to(torch.int8)
    zeros = None if spec.symmetric else zero.view(rows, groups).to(torch.int8)
    return codes, scale.view(rows, groups).to(scale_dtype), zeros


def grouped(values: torch.Tensor, spec: QuantSpec, cols: int) -> torch.Tensor | None:
    """A whole (R, cols) matrix viewed as (R, groups, group_size) when its groups tile its rows exactly, so
    that (R, groups, 1) scales broadcast over it without being repeated; None when they do not."""
    g = spec.group(cols)
    if spec.group_size is None or cols % g or values.shape[-1] != cols:
        return None
    return values.reshape(values.shape[0], cols // g, g)


def expand(grid: torch.Tensor, spec: QuantSpec, cols: int, columns: torch.Tensor | None = None,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """A per-(row, group) tensor (R, groups) looked up for every value: the whole (R, cols) matrix (columns
    None), values (R, k) at column indices `columns`, or flat values at (rows, columns) (both 1-D; columns
    may be None with one scale per row). With one group per row the (R, 1) grid itself is returned, to
    broadcast."""
    g = spec.group(cols)
    if rows is not None:
        index = rows.long() * grid.shape[1]
        return grid.reshape(-1)[index if grid.shape[1] == 1 else index + columns.long() // g]
    if grid.shape[1] == 1:  # one per row: broadcast
        return grid
    if columns is not None:
        return grid.gather(1, columns.long() // g)
    return grid.repeat_interleave(g, 1)[:, :cols]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """(codes - zero) * scale for codes and their looked-up scales / zeros (same shapes), computed in float32
    (exact: an integer of at most 9 bits times a scale of at most 24) and rounded once to dtype."""
    q = codes.float() if zero is None else codes.float() - zero.float()
    return (q * scale.float()).to(dtype)


def fake_quantize(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  spec: QuantSpec) -> torch.Tensor:
    """The values rounded to the grid in the forward, differentiable by the straight-through estimator: the
    gradient reaches values inside the code range unchanged, and the scale as in LSQ (round(v) - v inside,
    the clamped code outside). scale / zero are looked up per value (`expand`)."""
    z = 0.0 if zero is None else zero.float()
    position = grid_position(values, scale.float(), z, spec)
    if torch.is_grad_enabled() and (values.requires_grad or scale.requires_grad):
        codes = position + (torch.round(position) - position).detach()
    else:  # (inference through the training form: calibrating the next layers)
        codes = position.round_()
    return ((codes - z) * scale.float()).to(values.dtype)
