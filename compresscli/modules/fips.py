"""A linear layer whose weight is a shared dense base times a private sparse factor (FiPS).

The weight, viewed as d x h (d the block width, h the hidden width), is U @ (V * mask): U (d x r) is
one nn.Parameter shared by every layer of a group of blocks, V (r x h) belongs to this layer and is
sparse. A layer of orientation "in" maps d -> h (an MLP's fc1 / gate / up), one of orientation "out"
maps h -> d (fc2 / down). Stored as U once (a shared tensor) plus V as values + bitmask or CSR.
The training form keeps V dense with a mask; the inference form holds V as the file does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from . import sparse_codec
from .base import Codec, CompressedModule, register_codec, register_inference_form
from .compact_sparse import CompactSparse

ORIENTATIONS = ("in", "out")


class _FipsCodec(CompressedModule):
    """What both forms of a FiPS layer share: the codec (U a shared tensor, V values + bitmask or CSR, the
    bias dense) and the sizes. A form gives V masked and its mask (`_factor_and_mask`), V's shape, its
    non-zero count and value dtype."""

    base: nn.Parameter  # (d, r), the same nn.Parameter object in every layer of the group
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
        return self.base @ factor.to(self.base.dtype)

    def dense_weight(self) -> torch.Tensor:
        weight = self.weight_dxh()  # (d, h): fc2's (out, in) as is, fc1's transposed
        return weight.t() if self.orientation == "in" else weight

    def to_tensors(self) -> dict[str, torch.Tensor]:
        _, encoded = sparse_codec.encode(*self._factor_and_mask(), self.storage_format)
        return {**{f"factor.{k}": v for k, v in encoded.items()}, **self._bias_entry()}

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return {self.base_key: self.base}

    @classmethod
    def expected_shared(cls, params: dict[str, Any]) -> set[str]:
        return {params["base_key"]}

    def codec_params(self) -> dict[str, Any]:
        nnz = self._nnz()
        value_bytes = torch.empty(0, dtype=self._value_dtype()).element_size()
        fmt = sparse_codec.choose_format(self.rank, self.hidden, nnz, value_bytes, self.storage_format)
        return {"orientation": self.orientation, "width": self.width, "hidden": self.hidden, "rank": self.rank,
                "base_key": self.base_key, "counts_base": self.counts_base, "format": fmt, "nnz": nnz,
                "bias": self.bias is not None, "dtype": str(self._value_dtype()).removeprefix("torch.")}

    @classmethod
    def expected_tensors(cls, params: dict[str, Any]) -> set[str]:
        names = {f"factor.{k}" for k in sparse_codec.TENSORS_BY_FORMAT[params["format"]]}
        return names | ({"bias"} if params["bias"] else set())

    @staticmethod
    def _checked(tensors: dict[str, torch.Tensor], params: dict[str, Any],
                 shared: dict[str, nn.Parameter] | None) -> tuple[nn.Parameter, dict[str, torch.Tensor]]:
        """The shared base and V's encoding, after checking the base's and the bias's shapes."""
        base = (shared or {}).get(params["base_key"])
        if base is None:
            raise ValueError(f"fips_linear needs the shared base {params['base_key']!r}")
        if tuple(base.shape) != (params["width"], params["rank"]):
            raise ValueError(f"shared base {params['base_key']!r} is {tuple(base.shape)}, "
                             f"expected {(params['width'], params['rank'])}")
        bias, outputs = tensors.get("bias"), params["hidden"] if params["orientation"] == "in" else params["width"]
        if bias is not None and (bias.shape != (outputs,) or bias.dtype not in sparse_codec.VALUE_DTYPES):
            raise CheckpointError(f"invalid fips_linear layer: bias must be {outputs} floats, got {bias.dtype} "
                                  f"{list(bias.shape)}", "the file is damaged; re-export it")
        return base, {k.removeprefix("factor."): v for k, v in tensors.items() if k.startswith("factor.")}

    def stored_parameters(self) -> int:
        """Non-zeros of V, the bias, and U (d x r) in the one layer of its group with `counts_base`,
        so a model-wide sum counts the shared base exactly once."""
        count = self._nnz() + (self.bias.numel() if self.bias is not None else 0)
        return count + (self.base.numel() if self.counts_base else 0)

    def dense_equivalent(self) -> dict[str, torch.Size]:
        return {"weight": torch.Size((self.out_features, self.in_features)), **self._bias_entry(shape=True)}

    def extra_repr(self) -> str:
        density = self._nnz() / max(1, self.rank * self.hidden)
        return (f"{self.in_features} -> {self.out_features}, rank={self.rank}, orientation={self.orientation}, "
                f"base={self.base_key}, density={density:.3f}")


@register_codec
class FipsLinear(_FipsCodec):
    """The training form: V a dense Parameter with a mask buffer (its pattern may evolve during
    reconstruction), U the group's shared Parameter."""

    codec = Codec.FIPS_LINEAR

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

    @property
    def hidden(self) -> int:
        return self.factor.shape[1]

    def _factor_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factor * self.mask, self.mask

    def _nnz(self) -> int:
        return int(torch.count_nonzero(self.mask))

    def _value_dtype(self) -> torch.dtype:
        return self.factor.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.base, self.factor * self.mask  # (d, r), (r, h)
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
        factor, mask = sparse_codec.decode(params["format"], encoded, (params["rank"], params["hidden"]))
        return cls(base, factor.to(base.device), mask.to(base.device), tensors.get("bias"), params["orientation"],
                   params["base_key"], params["counts_base"])


@register_inference_form
class CompactFipsLinear(_FipsCodec):
    """The inference form: U once per group (shared, not trainable) and V held as its file holds it,
    oriented for the product: "in" layers keep V^T (h x r) and run y = (x @ U) @ V as a row-sparse
    product, "out" layers keep V (r x h) and run y = (x @ V^T) @ U^T. U @ V is never formed."""

    codec = Codec.FIPS_LINEAR
    last_path: str | None = None

    def __init__(self, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                 shared: dict[str, nn.Parameter] | None):
        super().__init__()
        if params["orientation"] not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {params['orientation']!r}")
        base, encoded = self._checked(tensors, params, shared)
        self.base = base
        self.orientation, self.base_key, self.counts_base = params["orientation"], params["base_key"], params["counts_base"]
        self._hidden = params["hidden"]
        self.matrix = CompactSparse.from_encoded(params["format"], encoded, (params["rank"], params["hidden"]),
                                                 transpose=self.orientation == "in")
        self.register_buffer("bias", tensors.get("bias"))

    @property
    def hidden(self) -> int:
        return self._hidden

    def _factor_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        factor, mask = self.matrix.dense(), self.matrix.mask()
        return (factor.t(), mask.t()) if self.orientation == "in" else (factor, mask)

    def _nnz(self) -> int:
        return self.matrix.nnz()

    def _value_dtype(self) -> torch.dtype:
        return self.matrix.values.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        if self.orientation == "in":  # (N, d) @ U -> (N, r), then V: (N, r) -> (N, h)
            y, path = self.matrix.mm(x2d @ self.base, self.bias)
        else:  # V: (N, h) -> (N, r), then U^T: (N, r) -> (N, d)
            z, path = self.matrix.mm(x2d)
            y = F.linear(z, self.base, self.bias)
        self.__dict__["last_path"] = path  # past nn.Module.__setattr__: a few us per call on tiny layers
        return y.view(*lead, self.out_features)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any],
                     shared: dict[str, nn.Parameter] | None = None) -> "CompactFipsLinear":
        return cls(tensors, params, shared)

    @classmethod
    def inference_extra_bytes(cls, params: dict[str, Any]) -> int:
        shape = (params["rank"], params["hidden"])
        rows, cols = shape[::-1] if params["orientation"] == "in" else shape
        return CompactSparse.extra_bytes(params["format"], rows, cols)
