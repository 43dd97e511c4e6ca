"""The training form of a FiPS layer: V a dense Parameter with a mask buffer (its pattern may evolve during
reconstruction), U the group's shared Parameter."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresscli.codecs.base import register_codec
from compresscli.codecs.fips.codec import ORIENTATIONS, _FipsCodec
from compresscli.codecs.sparse import encoding


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
        factor, mask = encoding.decode(params["format"], encoded, (params["rank"], params["hidden"]))
        return cls(base, factor.to(base.device), mask.to(base.device), tensors.get("bias"), params["orientation"],
                   params["base_key"], params["counts_base"], params["format"])
