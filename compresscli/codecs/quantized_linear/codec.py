"""The quantized_linear codec, what both forms of a dense Linear whose weight is stored quantized share: the
weight as integer codes + scales (+ zero points) on a per-row or per-group grid (codecs/quant), the bias dense.
The structure is the plain Linear's; only its values are smaller."""
from __future__ import annotations

from typing import Any

import torch

from compresscli.codecs.base import CompressedModule
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import FLOATS, tensor_names
from compresscli.core.errors import CheckpointError


class _QuantizedLinearCodec(CompressedModule):
    """Both forms give `in_features`, `out_features`, `bias`, `spec` and their stored weight tensors."""

    codec = "quantized_linear"
    in_features: int
    out_features: int
    bias: torch.Tensor | None
    spec: QuantSpec

    def _weight_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _value_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {**self._weight_tensors(), **self._bias_entry()}

    def codec_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": str(self._value_dtype()).removeprefix("torch."), "quant": self.spec.to_params()}

    @classmethod
    def expected_tensors(cls, params: dict[str, Any]) -> set[str]:
        return tensor_names("weight", QuantSpec.from_params(params["quant"])) | ({"bias"} if params["bias"] else set())

    @classmethod
    def _checked(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> QuantSpec:
        """The spec, after checking the bias (the codes and scales are checked where they are decoded)."""
        spec = QuantSpec.from_params(params["quant"])
        bias = tensors.get("bias")
        if bias is not None and (bias.shape != (params["out_features"],) or bias.dtype not in FLOATS):
            raise CheckpointError(f"invalid quantized_linear layer: bias must be {params['out_features']} floats, "
                                  f"got {bias.dtype} {list(bias.shape)}", "the file is damaged; re-export it")
        return spec

    def stored_parameters(self) -> int:
        return self.in_features * self.out_features + (self.bias.numel() if self.bias is not None else 0)

    def dense_equivalent(self) -> dict[str, torch.Size]:
        return {"weight": torch.Size((self.out_features, self.in_features)), **self._bias_entry(shape=True)}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, symmetric={self.spec.symmetric}")
