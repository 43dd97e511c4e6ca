"""The training form of a quantized Linear: the float weight (the shadow recovery trains) rounded to the grid
in every forward through the straight-through estimator, the scales trainable (codecs/quant/values.py)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compresscli.codecs.base import register_codec
from compresscli.codecs.quant.values import QuantizedValues, Quantizer
from compresscli.codecs.quantized_linear.codec import _QuantizedLinearCodec


@register_codec
class QuantizedLinear(nn.Linear, _QuantizedLinearCodec):
    """`weight` is the float shadow; `quantizer` holds the grid; the layer computes with the rounded weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def spec(self):
        return self.quantizer.spec

    @classmethod
    def from_dense(cls, linear: nn.Linear, quantizer: Quantizer, weight: torch.Tensor) -> "QuantizedLinear":
        """Takes over `linear`'s Parameters, its weight set to `weight` (on the grid already: a solver's result)."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        with torch.no_grad():
            linear.weight.data = weight.to(linear.weight.dtype)
        layer.weight, layer.bias, layer.quantizer = linear.weight, linear.bias, quantizer.to(linear.weight.device)
        return layer

    def dense_weight(self) -> torch.Tensor:
        return self.quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)  # (..., in) -> (..., out)

    def _weight_tensors(self) -> dict[str, torch.Tensor]:
        return self.quantizer.tensors("weight", self.quantizer.codes(self.weight))

    def _value_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "QuantizedLinear":
        spec = cls._checked(tensors, params)
        shape = (params["out_features"], params["in_features"])
        stored = QuantizedValues.from_tensors(tensors, "weight", spec, shape, shape)
        with torch.device("meta"):
            layer = cls(params["in_features"], params["out_features"], params["bias"])
        layer.weight = nn.Parameter(stored.dequantize())
        bias = tensors.get("bias")
        layer.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        layer.quantizer = Quantizer.of(stored)
        return layer
