"""A codec's stored values, quantized, in both forms: what every codec uses so that no codec quantizes on its own.

Stored as three tensors beside the codec's own: `NAME.codes` (int8, or packed uint8 below 8 bits; see
packing.py), `NAME.scales` (rows x groups, the checkpoint's float dtype) and, asymmetric only, `NAME.zeros`
(int8), where NAME is what the float values would be called (`weight`, `weight.values`, `values`,
`factor.values`, a shared key). The codec params record the spec under "quant" (its own values) or
"shared_quant" (its shared tensor).

- Training form (`Quantizer`): the codec keeps its float values (the shadow, trained) and asks the quantizer
  for them rounded to the grid (fake quantization, straight-through estimator). The scales train too: each
  is held as a mantissa in [1, 2) (the Parameter) times a fixed power of two, so AdamW's steps, about `lr`
  in size whatever the parameter's magnitude, move every scale by the same relative amount (a scale of 1e-3
  trained directly would jump by 10% a step at lr 1e-4). Codes are always recomputed from the shadow and the
  current scales, so what the file holds is exactly what the training form computes.
- Inference form (`QuantizedValues`): the three tensors as the file holds them, dequantized when a product
  needs them (or read by a kernel that takes them as they are).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresscli.codecs.quant import grid, packing
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.core.errors import CheckpointError

_DAMAGED = "the file is damaged; re-export it"
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor_names(name: str, spec: QuantSpec) -> set[str]:
    """The tensors values called `name` are stored as, quantized by `spec`."""
    return {f"{name}.codes", f"{name}.scales"} | (set() if spec.symmetric else {f"{name}.zeros"})


class Quantizer(nn.Module):
    """The training form's grid for one value tensor: scales (rows, groups) as a trainable mantissa times a
    fixed power of two, zero points fixed. `cols` is the width of the matrix the values sit in."""

    def __init__(self, spec: QuantSpec, scales: torch.Tensor, zeros: torch.Tensor | None, cols: int):
        super().__init__()
        self.spec, self.cols = spec, cols
        exponent = torch.exp2(torch.floor(torch.log2(scales.detach().float()))).to(scales.dtype)
        self.scale_mantissa = nn.Parameter(scales.detach() / exponent)  # exact: a division by a power of two
        self.register_buffer("scale_exponent", exponent)
        self.register_buffer("zeros", None if zeros is None else zeros.to(torch.int8))

    @classmethod
    def fit(cls, values: torch.Tensor, spec: QuantSpec, clip: str = "minmax") -> tuple["Quantizer", torch.Tensor]:
        """Round to nearest on values (rows, cols), scales in their dtype: (the quantizer, the dequantized values)."""
        codes, scales, zeros = grid.rtn(values, spec, values.dtype, clip)
        quantizer = cls(spec, scales, zeros, values.shape[1])
        return quantizer, quantizer.dequantize(codes)

    @classmethod
    def of(cls, stored: "QuantizedValues") -> "Quantizer":
        """The training form's quantizer on a stored grid."""
        zeros = None if stored.zeros is None else stored.zeros.detach()
        return cls(stored.spec, stored.scales.detach(), zeros, stored.cols)

    def scales(self) -> torch.Tensor:
        """(rows, groups) as stored: the mantissa times its power of two, exact in the scales' dtype."""
        return self.scale_mantissa * self.scale_exponent

    def _lookup(self, columns: torch.Tensor | None, rows: torch.Tensor | None,
                scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        zero = None if self.zeros is None else grid.expand(self.zeros, self.spec, self.cols, columns, rows)
        return grid.expand(scales, self.spec, self.cols, columns, rows), zero

    def forward(self, values: torch.Tensor, columns: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The values rounded to the grid (the whole matrix, values (R, k) at `columns`, or flat values at
        (rows, columns)); differentiable in the values and the scales."""
        scales = self.scales()
        tiles = None if columns is not None or rows is not None else grid.grouped(values, self.spec, self.cols)
        if tiles is not None:  # whole groups: the scales broadcast, never repeated
            zeros = None if self.zeros is None else self.zeros.unsqueeze(-1)
            return grid.fake_quantize(tiles, scales.unsqueeze(-1), zeros, self.spec).view(values.shape)
        return grid.fake_quantize(values, *self._lookup(columns, rows, scales), self.spec)

    def codes(self, values: torch.Tensor, columns: torch.Tensor | None = None,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """The int8 codes `forward` rounds the values to."""
        scale, zero = self._lookup(columns, rows, self.scales().detach())
        return torch.round(grid.grid_position(values.detach(), scale.float(), 0.0 if zero is None else zero.float(),
                                              self.spec)).to(torch.int8)

    def dequantize(self, codes: torch.Tensor, columns: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """Codes back to values in the scales' dtype (what the shadow starts from)."""
        scale = self.scales().detach()
        return grid.dequantize(codes, *self._lookup(columns, rows, scale), scale.dtype)

    def tensors(self, name: str, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the file stores for codes (rows, n) of these values (flat values: one row)."""
        stored = {f"{name}.codes": packing.pack(codes, self.spec.bits), f"{name}.scales": self.scales().detach()}
        return stored if self.zeros is None else {**stored, f"{name}.zeros": self.zeros}

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, group_size={self.spec.group_size}, symmetric={self.spec.symmetric}"


class QuantizedValues(nn.Module):
    """The inference form's values: packed codes (rows, n), scales and zero points as the file holds them
    (Parameters stay Parameters: a shared tensor is then one object in every layer holding it)."""

    def __init__(self, spec: QuantSpec, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 shape: tuple[int, int], cols: int):
        super().__init__()
        self.spec, self.shape, self.cols = spec, (int(shape[0]), int(shape[1])), cols
        for key, tensor in (("codes", codes), ("scales", scales), ("zeros", zeros)):
            if isinstance(tensor, nn.Parameter):
                setattr(self, key, tensor)
            else:
                self.register_buffer(key, tensor)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], name: str, spec: QuantSpec, shape: tuple[int, int],
                     grid_shape: tuple[int, int]) -> "QuantizedValues":
        """From the stored tensors of values called `name`: codes for a (rows, n) layout of the values, on a
        grid of (grid rows, grid columns); every shape and dtype checked, so a damaged file is a message."""
        codes, scales, zeros = (tensors.get(f"{name}.{k}") for k in ("codes", "scales", "zeros"))
        problem = _problem(spec, codes, scales, zeros, shape, grid_shape)
        if problem:
            raise CheckpointError(f"invalid quantized {name}: {problem}", _DAMAGED)
        return cls(spec, codes, scales, zeros, shape, grid_shape[1])

    def codes_int8(self) -> torch.Tensor:
        """The signed codes (rows, n)."""
        return packing.unpack(self.codes, self.spec.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype | None = None, columns: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """The values (rows, n) in `dtype` (default: the scales'), for the layouts grid.expand knows."""
        codes = self.codes_int8()
        tiles = None if columns is not None or rows is not None else grid.grouped(codes, self.spec, self.cols)
        if tiles is not None:  # whole groups: the scales broadcast, never repeated
            zeros = None if self.zeros is None else self.zeros.unsqueeze(-1)
            return grid.dequantize(tiles, self.scales.unsqueeze(-1), zeros, dtype or self.scales.dtype).view(codes.shape)
        if rows is not None:
            codes = codes.reshape(-1)
        zero = None if self.zeros is None else grid.expand(self.zeros, self.spec, self.cols, columns, rows)
        scale = grid.expand(self.scales, self.spec, self.cols, columns, rows)
        return grid.dequantize(codes, scale, zero, dtype or self.scales.dtype)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        stored = {f"{name}.codes": self.codes, f"{name}.scales": self.scales}
        return stored if self.zeros is None else {**stored, f"{name}.zeros": self.zeros}

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.spec.bits}, group_size={self.spec.group_size}"


def _problem(spec: QuantSpec, codes: Any, scales: Any, zeros: Any, shape: tuple[int, int],
             grid_shape: tuple[int, int]) -> str | None:
    rows, n = shape
    if not isinstance(codes, torch.Tensor) or not isinstance(scales, torch.Tensor):
        return "codes and scales are missing"
    want = (rows, packing.row_bytes(n, spec.bits))
    code_dtype = torch.int8 if spec.bits == 8 else torch.uint8
    if codes.dtype != code_dtype or tuple(codes.shape) != want:
        return f"codes must be {str(code_dtype)[6:]} {list(want)} for {spec.bits}-bit codes, got {codes.dtype} " \
               f"{list(codes.shape)}"
    groups = (grid_shape[0], spec.groups(grid_shape[1]))
    if scales.dtype not in FLOATS or tuple(scales.shape) != groups:
        return f"scales must be floats {list(groups)}, got {scales.dtype} {list(scales.shape)}"
    if spec.symmetric != (zeros is None):
        return "zero points are stored exactly when the grid is asymmetric"
    if zeros is not None and (zeros.dtype != torch.int8 or tuple(zeros.shape) != groups
                              or int(zeros.min()) < spec.qmin or int(zeros.max()) > spec.qmax):
        return f"zeros must be int8 {list(groups)} in [{spec.qmin}, {spec.qmax}]"
    return None


def shared_shadow(stored: QuantizedValues, shape: tuple[int, ...] | None = None) -> tuple[nn.Parameter, Quantizer]:
    """The float shadow (`shape`, default the stored one) and quantizer of shared values (a FiPS base, an RPS
    memory) in the training form, made once for all the layers reading them: the loader hands each of them
    the same codes Parameter, which keeps what was made from it (so it lives exactly as long as it does)."""
    made = getattr(stored.codes, "_training_form", None)
    if made is None:
        shadow = stored.dequantize()
        made = (nn.Parameter(shadow if shape is None else shadow.view(shape)), Quantizer.of(stored))
        stored.codes._training_form = made
    return made
