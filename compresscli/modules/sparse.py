"""Sparse Linear / Conv2d, stored as values + bitmask (or CSR). The training forms keep a dense weight and a
fixed mask for recovery; the inference forms (sparse_compact.py) hold only what the file holds."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import sparse_codec
from .base import CONV_ARGS, Codec, CompressedModule, conv_params, register_codec


class _SparseCodec(CompressedModule):
    """The codec both forms of a sparse layer share: its weight as values + bitmask or CSR, its bias dense.
    A form gives its masked weight and mask (`_weight_and_mask`), its weight shape and non-zero count."""

    storage_format: str = "auto"  # "bitmask", "csr", or "auto": whichever is smaller on disk
    bias: torch.Tensor | None

    def _weight_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _nnz(self) -> int:
        raise NotImplementedError

    def _value_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def stored_parameters(self) -> int:
        return self._nnz() + (self.bias.numel() if self.bias is not None else 0)

    def dense_equivalent(self) -> dict[str, torch.Size]:
        return {"weight": torch.Size(self._weight_shape()), **self._bias_entry(shape=True)}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"weight.{k}": v for k, v in self._encoded().items()}, **self._bias_entry()}

    def _encoded(self) -> dict[str, torch.Tensor]:
        """The weight's sparse_codec encoding (a form holding it encoded already returns it as it is)."""
        return sparse_codec.encode(*self._weight_and_mask(), self.storage_format)[1]

    def _weight_params(self) -> dict[str, Any]:
        shape, nnz = self._weight_shape(), self._nnz()
        value_bytes = torch.empty(0, dtype=self._value_dtype()).element_size()
        fmt = sparse_codec.choose_format(shape[0], math.prod(shape[1:]), nnz, value_bytes, self.storage_format)
        return {"format": fmt, "weight_shape": list(shape), "bias": self.bias is not None,
                "nnz": nnz, "dtype": str(self._value_dtype()).removeprefix("torch.")}

    @classmethod
    def expected_tensors(cls, params: dict[str, Any]) -> set[str]:
        names = {f"weight.{k}" for k in sparse_codec.TENSORS_BY_FORMAT[params["format"]]}
        return names | ({"bias"} if params["bias"] else set())

    @staticmethod
    def _encoded_weight(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix("weight."): v for k, v in tensors.items() if k.startswith("weight.")}

    @classmethod
    def _decode_weight(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return sparse_codec.decode(params["format"], cls._encoded_weight(tensors), tuple(params["weight_shape"]))


class _SparseWeight(_SparseCodec):
    """The training form: a `mask` buffer, fixed after pruning.

    The weight stays a dense parameter in memory so recovery can train the kept entries; the
    masked product in `forward` keeps pruned entries at exactly zero and their gradients at zero.
    """

    mask: torch.Tensor

    def _init_mask(self, mask: torch.Tensor | None) -> None:
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
        weight, mask = cls._decode_weight(tensors, params)
        layer.storage_format = params["format"]
        return layer._load(weight, mask, tensors.get("bias"))

    def dense_weight(self) -> torch.Tensor:
        return self.weight * self.mask

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
    codec = Codec.SPARSE_LINEAR

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
    codec = Codec.SPARSE_CONV2D
    _CONV_ARGS = (*CONV_ARGS, "padding_mode")  # nn.Conv2d's own forward runs, so any padding mode works

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
