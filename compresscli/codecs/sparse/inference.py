"""The inference forms of the sparse layers: the weight held as its file holds it (CompactSparse), run by the
row-sparse kernels; no dense weight, no mask, nothing trainable. Same codec as the training forms (training.py)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compresscli.codecs.base import conv_params, register_inference_form
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.sparse.matrix import CompactSparse
from compresscli.codecs.sparse.codec import CONV_LAYOUT, _SparseCodec


class _CompactWeight(_SparseCodec):
    """What both compact sparse layers share: `matrix` (out x fan-in, CompactSparse) and a `bias` buffer."""

    weight_shape: tuple[int, ...]
    last_path: str | None = None  # the product that ran last, for speed reports

    def _init_compact(self, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> None:
        self.weight_shape = tuple(params["weight_shape"])
        self.storage_format = params["format"]  # the file's: its tensors are in it, so its params must say so
        self.matrix = CompactSparse.from_encoded(params["format"], self._encoded_weight(tensors), self.weight_shape,
                                                 spec=QuantSpec.from_params(params.get("quant")), nnz=params["nnz"])
        self.register_buffer("bias", self._bias(tensors))

    def dense_weight(self) -> torch.Tensor:
        return self.matrix.dense().view(self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:
        """Dense view, made on demand for code that reads `.weight`; never stored."""
        return self.dense_weight()

    def _weight_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dense_weight(), self.matrix.mask().view(self.weight_shape)

    def _encoded(self) -> dict[str, torch.Tensor]:
        return self.matrix.encoded()

    def _weight_shape(self) -> tuple[int, ...]:
        return self.weight_shape

    def _nnz(self) -> int:
        return self.matrix.nnz()

    def _value_dtype(self) -> torch.dtype:
        return self.matrix.value_dtype

    def _spec(self) -> QuantSpec | None:
        return None if self.matrix.quantized is None else self.matrix.quantized.spec

    @classmethod
    def inference_extra_bytes(cls, params: dict[str, Any]) -> int:
        shape = params["weight_shape"]
        return CompactSparse.extra_bytes(params["format"], shape[0], math.prod(shape[1:]))


@register_inference_form
class CompactSparseLinear(_CompactWeight):
    codec = "sparse_linear"
    export_formats = frozenset({"compressed-tensors"})  # sparse-bitmask, or sparse-24-bitmask when 2:4

    def __init__(self, tensors: dict[str, torch.Tensor], params: dict[str, Any]):
        super().__init__()
        self.in_features, self.out_features = params["in_features"], params["out_features"]
        self._init_compact(tensors, params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y, path = self.matrix.mm(x.reshape(-1, self.in_features), self.bias)  # (N, in) -> (N, out)
        self.__dict__["last_path"] = path  # past nn.Module.__setattr__: a few us per call on tiny layers
        return y.view(*lead, self.out_features)

    def codec_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, **self._weight_params()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "CompactSparseLinear":
        return cls(tensors, params)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.matrix.extra_repr()}"


@register_inference_form
class CompactSparseConv2d(_CompactWeight):
    """A sparse Conv2d whose forward decodes its weight for the call (the row-sparse kernels serve Linear
    layers); the decoded weight is dropped when the call returns."""

    codec = "sparse_conv2d"
    _CONV_ARGS = CONV_LAYOUT

    def __init__(self, tensors: dict[str, torch.Tensor], params: dict[str, Any]):
        super().__init__()
        for name in self._CONV_ARGS:
            value = params[name]
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        self._init_compact(tensors, params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.__dict__["last_path"] = "dense"
        weight = self.dense_weight().to(x.dtype)
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad in that mode, then convolve unpadded
            pad = [p for p in reversed(self.padding) for _ in range(2)]
            return F.conv2d(F.pad(x, pad, mode=self.padding_mode), weight, self.bias, self.stride, 0, self.dilation,
                            self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def codec_params(self) -> dict[str, Any]:
        return {**conv_params(self, self._CONV_ARGS), **self._weight_params()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "CompactSparseConv2d":
        return cls(tensors, params)

