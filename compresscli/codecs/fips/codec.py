"""The FiPS codec, what both forms of a FiPS layer share: a linear layer whose weight is a shared dense base
times a private sparse factor.

The weight, viewed as d x h (d the block width, h the hidden width), is U @ (V * mask): U (d x r) is
one nn.Parameter shared by every layer of a group of blocks, V (r x h) belongs to this layer and is
sparse. A layer of orientation "in" maps d -> h (an MLP's fc1 / gate / up), one of orientation "out"
maps h -> d (fc2 / down). Stored as U once (a shared tensor) plus V as values + bitmask or CSR. Either may
be quantized (codecs/quant): V's values (params "quant", on a grid over V's (r, h)) and U (params
"shared_quant", stored as the shared tensors KEY.codes / KEY.scales on a grid over (d, r)).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresscli.codecs.base import CompressedModule
from compresscli.codecs.quant.grid import QuantSpec
from compresscli.codecs.quant.values import tensor_names
from compresscli.codecs.sparse import encoding, quantized
from compresscli.core.errors import CheckpointError

ORIENTATIONS = ("in", "out")


class _FipsCodec(CompressedModule):
    """What both forms of a FiPS layer share: the codec (U a shared tensor, V values + bitmask or CSR, the
    bias dense) and the sizes. A form gives V masked and its mask (`_factor_and_mask`), U as it computes
    (`_base_values`), V's non-zero count, value dtype and the specs V and U are quantized by (None: floats)."""

    base: nn.Module  # (d, r): the same object in every layer of the group (a Parameter, or its stored codes)
    bias: torch.Tensor | None
    orientation: str
    base_key: str
    counts_base: bool  # True in exactly one layer per group, so U is counted once
    storage_format: str = "auto"

    def _factor_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _nnz(self) -> int:
        raise NotImplementedError

    def _value_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _base_values(self) -> torch.Tensor:
        raise NotImplementedError

    def _specs(self) -> tuple[QuantSpec | None, QuantSpec | None]:
        """(V's spec, U's spec)."""
        raise NotImplementedError

    def _encoded_factor(self) -> dict[str, torch.Tensor]:
        return encoding.encode(*self._factor_and_mask(), self.storage_format)[1]

    def _shared_stored(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def width(self) -> int:
        return self.base.shape[0]

    @property
    def rank(self) -> int:
        return self.base.shape[1]

    @property
    def hidden(self) -> int:
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        return self.width if self.orientation == "in" else self.hidden

    @property
    def out_features(self) -> int:
        return self.hidden if self.orientation == "in" else self.width

    def weight_dxh(self) -> torch.Tensor:
        """The effective weight viewed as d x h (fc1's weight transposed, fc2's weight as is)."""
        factor, _ = self._factor_and_mask()
        base = self._base_values()
        return base @ factor.to(base.dtype)

    def dense_weight(self) -> torch.Tensor:
        weight = self.weight_dxh()  # (d, h): fc2's (out, in) as is, fc1's transposed
        return weight.t() if self.orientation == "in" else weight

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"factor.{k}": v for k, v in self._encoded_factor().items()}, **self._bias_entry()}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return self._shared_stored()

    @classmethod
    def expected_shared(cls, params: dict[str, Any]) -> set[str]:
        spec = QuantSpec.from_params(params.get("shared_quant"))
        return {params["base_key"]} if spec is None else tensor_names(params["base_key"], spec)

    def codec_params(self) -> dict[str, Any]:
        nnz = self._nnz()
        value_bytes = torch.empty(0, dtype=self._value_dtype()).element_size()
        fmt = encoding.choose_format(self.rank, self.hidden, nnz, value_bytes, self.storage_format)
        own, base = self._specs()
        quant = ({} if own is None else {"quant": own.to_params()}) | \
            ({} if base is None else {"shared_quant": base.to_params()})
        return {"orientation": self.orientation, "width": self.width, "hidden": self.hidden, "rank": self.rank,
                "base_key": self.base_key, "counts_base": self.counts_base, "format": fmt, "nnz": nnz,
                "bias": self.bias is not None, "dtype": str(self._value_dtype()).removeprefix("torch."), **quant}

    @classmethod
    def expected_tensors(cls, params: dict[str, Any]) -> set[str]:
        spec = QuantSpec.from_params(params.get("quant"))
        stored = encoding.TENSORS_BY_FORMAT[params["format"]] if spec is None else quantized.names(params["format"], spec)
        return {f"factor.{k}" for k in stored} | ({"bias"} if params["bias"] else set())

    @staticmethod
    def _checked(tensors: dict[str, torch.Tensor], params: dict[str, Any],
                 shared: dict[str, nn.Parameter] | None) -> tuple[nn.Parameter | None, dict[str, torch.Tensor]]:
        """The shared base (None when it is stored quantized: the form decodes it) and V's encoding, after
        checking the base's and the bias's shapes."""
        base = (shared or {}).get(params["base_key"])
        base_spec = QuantSpec.from_params(params.get("shared_quant"))
        if base_spec is not None:
            base = None
            if not tensor_names(params["base_key"], base_spec) <= set(shared or {}):
                raise ValueError(f"fips_linear needs the shared base {params['base_key']!r}, quantized")
        elif base is None:
            raise ValueError(f"fips_linear needs the shared base {params['base_key']!r}")
        if base is not None and tuple(base.shape) != (params["width"], params["rank"]):
            raise ValueError(f"shared base {params['base_key']!r} is {tuple(base.shape)}, "
                             f"expected {(params['width'], params['rank'])}")
        bias, outputs = tensors.get("bias"), params["hidden"] if params["orientation"] == "in" else params["width"]
        if bias is not None and (bias.shape != (outputs,) or bias.dtype not in encoding.VALUE_DTYPES):
            raise CheckpointError(f"invalid fips_linear layer: bias must be {outputs} floats, got {bias.dtype} "
                                  f"{list(bias.shape)}", "the file is damaged; re-export it")
        return base, {k.removeprefix("factor."): v for k, v in tensors.items() if k.startswith("factor.")}

    def stored_parameters(self) -> int:
        """Non-zeros of V, the bias, and U (d x r) in the one layer of its group with `counts_base`,
        so a model-wide sum counts the shared base exactly once."""
        count = self._nnz() + (self.bias.numel() if self.bias is not None else 0)
        return count + (self.width * self.rank if self.counts_base else 0)

    def dense_equivalent(self) -> dict[str, torch.Size]:
        return {"weight": torch.Size((self.out_features, self.in_features)), **self._bias_entry(shape=True)}

    def extra_repr(self) -> str:
        density = self._nnz() / max(1, self.rank * self.hidden)
        return (f"{self.in_features} -> {self.out_features}, rank={self.rank}, orientation={self.orientation}, "
                f"base={self.base_key}, density={density:.3f}")
