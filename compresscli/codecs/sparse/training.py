"""The training forms of the sparse layers: a dense weight Parameter and a fixed mask, so that recovery trains
the kept entries, and (quantized values) a Quantizer rounding them to the grid in every forward (the inference
forms, inference.py, hold only what the file holds)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compresscli.codecs.base import conv_params, register_codec
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import Quantizer
from compresscli.codecs.sparse import quantized
from compresscli.codecs.sparse.codec import CONV_LAYOUT, _SparseCodec


class _SparseWeight(_SparseCodec):
    """The training form: a `mask` buffer, fixed after pruning.

    The weight stays a dense parameter in memory so recovery can train the kept entries; the
    masked product in `forward` keeps pruned entries at exactly zero and their gradients at zero.
    """

    mask: torch.Tensor
    quantizer: Quantizer | None  # quantized values: the grid over the weight viewed as (out, rest)

    def _init_mask(self, mask: torch.Tensor | None) -> None:
        self.register_module("quantizer", None)
        if mask is None:
            mask = torch.ones_like(self.weight, dtype=torch.bool)
        self.register_buffer("mask", mask.to(device=self.weight.device, dtype=torch.bool))
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def _adopt(self, dense: nn.Module, mask: torch.Tensor):
        """Use `dense`'s weight and bias Parameters as this layer's, with `mask` applied in place."""
        self.weight, self.bias = dense.weight, dense.bias
        self.register_buffer("mask", mask.to(device=dense.weight.device, dtype=torch.bool))
        with torch.no_grad():
            self.weight.mul_(self.mask)
        return self

    def _load(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None):
        """Take a decoded weight (zero where `mask` is False) and bias as this layer's (built on the meta device:
        no random initialisation to overwrite, no copy of the weight)."""
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("mask", mask.to(device=weight.device, dtype=torch.bool))
        return self

    @classmethod
    def _decoded(cls, layer: "_SparseWeight", tensors: dict[str, torch.Tensor], params: dict[str, Any]):
        """`layer` (built on the meta device) holding the decoded weight, in the format its file chose."""
        spec = QuantSpec.from_params(params.get("quant"))
        layer.storage_format = params["format"]
        if spec is None:
            weight, mask = cls._decode_weight(tensors, params)
            return layer._load(weight, mask, cls._bias(tensors))
        shape = tuple(params["weight_shape"])
        values, mask = quantized.decode(params["format"], cls._encoded_weight(tensors), shape, spec, params["nnz"])
        layer._load(quantized.dense(values, mask).view(shape), mask.view(shape), cls._bias(tensors))
        layer.quantizer = Quantizer.of(values)
        return layer

    def _rounded_weight(self) -> torch.Tensor:
        """The weight as it computes: the shadow, rounded to the grid when the values are quantized."""
        if self.quantizer is None:
            return self.weight
        return self.quantizer(self.weight.view(self.weight.shape[0], -1)).view(self.weight.shape)

    def dense_weight(self) -> torch.Tensor:
        return self._rounded_weight() * self.mask

    def quantizable_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The values to quantize as a (rows, cols) matrix (zero where pruned) and the kept entries' mask."""
        return self.dense_weight().detach().view(self.weight.shape[0], -1), self.mask.view(self.weight.shape[0], -1)

    def quantize_values_(self, quantizer: Quantizer, values: torch.Tensor) -> None:
        """Store the values on `quantizer`'s grid from now on, the shadow set to `values` (rows, cols)."""
        with torch.no_grad():
            self.weight.copy_(values.view(self.weight.shape) * self.mask)
        self.quantizer = quantizer.to(self.weight.device)

    def _encoded(self) -> dict[str, torch.Tensor]:
        if self.quantizer is None:
            return super()._encoded()
        return quantized.encode(self.weight, self.mask, self.quantizer, self.storage_format)

    def _spec(self) -> QuantSpec | None:
        return None if self.quantizer is None else self.quantizer.spec

    def _weight_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.mask

    def _weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def _nnz(self) -> int:
        return int(torch.count_nonzero(self.mask))

    def _value_dtype(self) -> torch.dtype:
        return self.weight.dtype


@register_codec
class SparseLinear(nn.Linear, _SparseWeight):
    codec = "sparse_linear"
    export_formats = frozenset({"compressed-tensors"})  # sparse-bitmask, or sparse-24-bitmask when 2:4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mask: torch.Tensor | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask(mask)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor) -> "SparseLinear":
        """Takes over `linear`'s parameters (pruned in place): no second copy of the weight."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        return layer._adopt(linear, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)  # (..., in) -> (..., out)

    def codec_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, **self._weight_params()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "SparseLinear":
        with torch.device("meta"):
            layer = cls(params["in_features"], params["out_features"], params["bias"])
        return cls._decoded(layer, tensors, params)


@register_codec
class SparseConv2d(nn.Conv2d, _SparseWeight):
    codec = "sparse_conv2d"
    _CONV_ARGS = CONV_LAYOUT

    def __init__(self, *args, mask: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask(mask)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor) -> "SparseConv2d":
        """Takes over `conv`'s parameters (pruned in place): no second copy of the weight."""
        with torch.device("meta"):
            layer = cls(**{name: getattr(conv, name) for name in cls._CONV_ARGS}, bias=conv.bias is not None)
        return layer._adopt(conv, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.dense_weight(), self.bias)  # (B, C, H, W) -> (B, O, H', W')

    def codec_params(self) -> dict[str, Any]:
        return {**conv_params(self, self._CONV_ARGS), **self._weight_params()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "SparseConv2d":
        kwargs = {name: (tuple(params[name]) if isinstance(params[name], list) else params[name])
                  for name in cls._CONV_ARGS}
        with torch.device("meta"):
            layer = cls(**kwargs, bias=params["bias"])
        return cls._decoded(layer, tensors, params)
