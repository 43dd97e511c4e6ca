"""The sparse codec, what both forms of a sparse Linear / Conv2d share: the weight stored as values +
bitmask or CSR (encoding.py), the values as floats or quantized (quantized.py: codes + scales, params
"quant"), the bias dense, the params that describe them."""
from __future__ import annotations

import math
from typing import Any

import torch

from compresscli.codecs.base import CONV_ARGS, CompressedModule
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.sparse import encoding, quantized
from compresscli.core.errors import CheckpointError

CONV_LAYOUT = (*CONV_ARGS, "padding_mode")  # nn.Conv2d's own forward runs, so any padding mode works


class _SparseCodec(CompressedModule):
    """The codec both forms of a sparse layer share: its weight as values + bitmask or CSR, its bias dense.
    A form gives its masked weight and mask (`_weight_and_mask`), its weight shape and non-zero count, and
    the spec its values are quantized by (`_spec`, None: floats)."""

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

    def _spec(self) -> QuantSpec | None:
        raise NotImplementedError

    def stored_parameters(self) -> int:
        return self._nnz() + (self.bias.numel() if self.bias is not None else 0)

    def dense_equivalent(self) -> dict[str, torch.Size]:
        return {"weight": torch.Size(self._weight_shape()), **self._bias_entry(shape=True)}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"weight.{k}": v for k, v in self._encoded().items()}, **self._bias_entry()}

    def _encoded(self) -> dict[str, torch.Tensor]:
        """The weight's encoding (a form holding it encoded already returns it as it is)."""
        return encoding.encode(*self._weight_and_mask(), self.storage_format)[1]

    def _weight_params(self) -> dict[str, Any]:
        shape, nnz = self._weight_shape(), self._nnz()
        value_bytes = torch.empty(0, dtype=self._value_dtype()).element_size()
        fmt = encoding.choose_format(shape[0], math.prod(shape[1:]), nnz, value_bytes, self.storage_format)
        quant = {} if self._spec() is None else {"quant": self._spec().to_params()}
        return {"format": fmt, "weight_shape": list(shape), "bias": self.bias is not None,
                "nnz": nnz, "dtype": str(self._value_dtype()).removeprefix("torch."), **quant}

    @classmethod
    def expected_tensors(cls, params: dict[str, Any]) -> set[str]:
        spec = QuantSpec.from_params(params.get("quant"))
        stored = encoding.TENSORS_BY_FORMAT[params["format"]] if spec is None else quantized.names(params["format"], spec)
        return {f"weight.{k}" for k in stored} | ({"bias"} if params["bias"] else set())

    @staticmethod
    def _bias(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The stored bias, after checking it is floating point (its shape is the loader's to check)."""
        bias = tensors.get("bias")
        if bias is not None and bias.dtype not in encoding.VALUE_DTYPES:
            raise CheckpointError(f"invalid sparse layer: bias must be floats, got {bias.dtype}",
                                  "the file is damaged; re-export it")
        return bias

    @staticmethod
    def _encoded_weight(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix("weight."): v for k, v in tensors.items() if k.startswith("weight.")}

    @classmethod
    def _decode_weight(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return encoding.decode(params["format"], cls._encoded_weight(tensors), tuple(params["weight_shape"]))
