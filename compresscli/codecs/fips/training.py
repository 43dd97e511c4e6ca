"""The training form of a FiPS layer: V a dense Parameter with a mask buffer (its pattern may evolve during
reconstruction), U the group's shared Parameter; quantized, each rounded to its grid in every forward by a
Quantizer (U's shared by the group, as U is)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresscli.codecs.base import register_codec
from compresscli.codecs.fips.codec import ORIENTATIONS, _FipsCodec
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import QuantizedValues, Quantizer, shared_shadow
from compresscli.codecs.sparse import encoding, quantized


@register_codec
class FipsLinear(_FipsCodec):
    """The training form: V a dense Parameter with a mask buffer (its pattern may evolve during
    reconstruction), U the group's shared Parameter."""

    codec = "fips_linear"

    def __init__(self, base: nn.Parameter, factor: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                 orientation: str, base_key: str, counts_base: bool, storage_format: str = "auto"):
        super().__init__()
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if base.shape[1] != factor.shape[0] or factor.shape != mask.shape:
            raise ValueError(f"base {tuple(base.shape)}, factor {tuple(factor.shape)} and mask {tuple(mask.shape)} "
                             "do not fit: base is d x r, factor and mask r x h")
        mask = mask.to(device=factor.device, dtype=torch.bool)
        self.base = base
        self.factor = nn.Parameter(factor.detach() * mask)  # (r, h); zero wherever the mask is False
        self.register_buffer("mask", mask)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.orientation = orientation
        self.base_key = base_key
        self.counts_base = counts_base
        self.storage_format = storage_format
        self.register_module("quantizer", None)  # V's values quantized
        self.register_module("base_quantizer", None)  # U quantized: the same Quantizer in every layer of the group

    @property
    def hidden(self) -> int:
        return self.factor.shape[1]

    def _factor_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.factor if self.quantizer is None else self.quantizer(self.factor)
        return factor * self.mask, self.mask

    def _base_values(self) -> torch.Tensor:
        return self.base if self.base_quantizer is None else self.base_quantizer(self.base)

    def _specs(self) -> tuple[QuantSpec | None, QuantSpec | None]:
        return tuple(None if q is None else q.spec for q in (self.quantizer, self.base_quantizer))

    def _encoded_factor(self) -> dict[str, torch.Tensor]:
        if self.quantizer is None:
            return super()._encoded_factor()
        return quantized.encode(self.factor, self.mask, self.quantizer, self.storage_format)

    def _shared_stored(self) -> dict[str, torch.Tensor]:
        if self.base_quantizer is None:
            return {self.base_key: self.base}
        return self.base_quantizer.tensors(self.base_key, self.base_quantizer.codes(self.base))

    def quantizable_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """V's values to quantize, (r, h) zero where pruned, and its mask."""
        factor, mask = self._factor_and_mask()
        return factor.detach(), mask

    def quantize_values_(self, quantizer: Quantizer, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.factor.copy_(values * self.mask)
        self.quantizer = quantizer.to(self.factor.device)

    def quantizable_shared(self) -> dict[str, torch.Tensor]:
        """The shared values (key -> (rows, cols)) a quantize stage may put on a grid: U."""
        return {self.base_key: self._base_values().detach()}

    def quantize_shared_(self, key: str, quantizer: Quantizer, values: torch.Tensor) -> None:
        """U on `quantizer`'s grid from now on (the same quantizer and values for every layer of the group)."""
        with torch.no_grad():
            self.base.copy_(values)
        self.base_quantizer = quantizer.to(self.base.device)

    def _nnz(self) -> int:
        return int(torch.count_nonzero(self.mask))

    def _value_dtype(self) -> torch.dtype:
        return self.factor.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self._base_values(), self._factor_and_mask()[0]  # (d, r), (r, h)
        tokens = x.numel() // x.shape[-1]
        # Same function either way; multiply in the order with fewer flops for this input.
        factored = tokens * self.rank * (self.width + self.hidden) <= self.width * self.hidden * (self.rank + tokens)
        if self.orientation == "in":  # (..., d) -> (..., h)
            y = (x @ u) @ v if factored else x @ (u @ v)
        else:  # (..., h) -> (..., d)
            y = (x @ v.t()) @ u.t() if factored else x @ (u @ v).t()
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "FipsLinear":
        base, encoded = cls._checked(tensors, params, shared)
        base_spec, spec = QuantSpec.from_params(params.get("shared_quant")), QuantSpec.from_params(params.get("quant"))
        base_quantizer = quantizer = None
        if base_spec is not None:
            shape = (params["width"], params["rank"])
            stored = QuantizedValues.from_tensors(shared, params["base_key"], base_spec, shape, shape)
            base, base_quantizer = shared_shadow(stored)
        if spec is None:
            factor, mask = encoding.decode(params["format"], encoded, (params["rank"], params["hidden"]))
        else:
            values, mask = quantized.decode(params["format"], encoded, (params["rank"], params["hidden"]), spec,
                                            params["nnz"])
            factor, quantizer = quantized.dense(values, mask), Quantizer.of(values)
        layer = cls(base, factor.to(base.device), mask.to(base.device), tensors.get("bias"), params["orientation"],
                    params["base_key"], params["counts_base"], params["format"])
        layer.quantizer, layer.base_quantizer = quantizer, base_quantizer
        return layer
