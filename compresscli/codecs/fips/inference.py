"""The inference form of a FiPS layer: U once per group and V held as its file holds it (CompactSparse), run
by the row-sparse kernels; U @ V is never formed. Quantized U or V are held as their codes and scales and
dequantized for each call (an "in" layer's quantized V then multiplies densely: its codes are not transposed)."""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from compresscli.codecs.base import register_inference_form
from compresscli.codecs.fips.codec import ORIENTATIONS, _FipsCodec
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import QuantizedValues
from compresscli.codecs.sparse.matrix import CompactSparse
from compresscli.kernels import dispatch


_projections: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # (id(x), id(U)) -> (x's version, x @ U)


def project_once(x: torch.Tensor, x2d: torch.Tensor, base: torch.Tensor | nn.Module,
                 values: Callable[[], torch.Tensor]) -> torch.Tensor:
    """x2d @ U (U = `values()`, the float values of the shared `base`), computed once for the "in" layers that
    read the same input `x` (the same tensor, unchanged) with the same U: an MLP's gate and up projections read
    U once per token, not twice. The result lives as long as `x` does."""
    key = (id(x), id(base))
    last = _projections.get(key)
    if last is not None and last[0] == x._version:
        return last[1]
    projected = dispatch.row_major_mm(x2d, values())  # (N, d) @ (d, r) -> (N, r)
    if not (torch.is_grad_enabled() and x.requires_grad):
        if last is None:
            weakref.finalize(x, _projections.pop, key, None)
        _projections[key] = (x._version, projected)
    return projected


@register_inference_form
class CompactFipsLinear(_FipsCodec):
    """The inference form: U once per group (shared, not trainable) and V held as its file holds it,
    oriented for the product: "in" layers keep V^T (h x r) and run y = (x @ U) @ V as a row-sparse
    product, "out" layers keep V (r x h) and run y = (x @ V^T) @ U^T. U @ V is never formed."""

    codec = "fips_linear"
    last_path: str | None = None

    def __init__(self, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                 shared: dict[str, nn.Parameter] | None):
        super().__init__()
        if params["orientation"] not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {params['orientation']!r}")
        base, encoded = self._checked(tensors, params, shared)
        base_spec, spec = QuantSpec.from_params(params.get("shared_quant")), QuantSpec.from_params(params.get("quant"))
        shape = (params["width"], params["rank"])
        self.base = base if base_spec is None else QuantizedValues.from_tensors(shared, params["base_key"], base_spec,
                                                                                 shape, shape)
        self.orientation, self.base_key, self.counts_base = params["orientation"], params["base_key"], params["counts_base"]
        self._hidden = params["hidden"]
        self.storage_format = params["format"]  # the file's: its tensors are in it, so its params must say so
        self.matrix = CompactSparse.from_encoded(params["format"], encoded, (params["rank"], params["hidden"]),
                                                 transpose=self.orientation == "in" and spec is None, spec=spec,
                                                 nnz=params["nnz"])
        self.register_buffer("bias", tensors.get("bias"))

    @property
    def transposed(self) -> bool:
        """Whether V is held transposed (an "in" layer's float V, for the row-sparse product)."""
        return self.orientation == "in" and self.matrix.quantized is None

    @property
    def hidden(self) -> int:
        return self._hidden

    def _factor_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        factor, mask = self.matrix.dense(), self.matrix.mask()
        return (factor.t(), mask.t()) if self.transposed else (factor, mask)

    def _nnz(self) -> int:
        return self.matrix.nnz()

    def _value_dtype(self) -> torch.dtype:
        return self.matrix.value_dtype

    def _base_values(self) -> torch.Tensor:
        return self.base.dequantize() if isinstance(self.base, QuantizedValues) else self.base

    def _specs(self) -> tuple[QuantSpec | None, QuantSpec | None]:
        return (None if self.matrix.quantized is None else self.matrix.quantized.spec,
                self.base.spec if isinstance(self.base, QuantizedValues) else None)

    def _encoded_factor(self) -> dict[str, torch.Tensor]:
        return super()._encoded_factor() if self.matrix.quantized is None else self.matrix.encoded()

    def _shared_stored(self) -> dict[str, torch.Tensor]:
        if isinstance(self.base, QuantizedValues):
            return self.base.tensors(self.base_key)
        return {self.base_key: self.base}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        if self.orientation == "in" and not self.transposed:  # quantized V, dequantized: (N, d) @ U @ V
            y, path = project_once(x, x2d, self.base, self._base_values) @ self.matrix.dense(), "dense"
            y = y if self.bias is None else y + self.bias
        elif self.orientation == "in":  # (N, d) @ U -> (N, r), then V: (N, r) -> (N, h)
            y, path = self.matrix.mm(project_once(x, x2d, self.base, self._base_values), self.bias)
        else:  # V: (N, h) -> (N, r), then U^T: (N, r) -> (N, d)
            z, path = self.matrix.mm(x2d)
            y = F.linear(z, self._base_values(), self.bias)
        self.__dict__["last_path"] = path  # past nn.Module.__setattr__: a few us per call on tiny layers
        return y.view(*lead, self.out_features)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "CompactFipsLinear":
        return cls(tensors, params, shared)

    @classmethod
    def inference_extra_bytes(cls, params: dict[str, Any]) -> int:
        shape = (params["rank"], params["hidden"])
        transposed = params["orientation"] == "in" and params.get("quant") is None
        rows, cols = shape[::-1] if transposed else shape
        return CompactSparse.extra_bytes(params["format"], rows, cols, params["nnz"], transposed)
