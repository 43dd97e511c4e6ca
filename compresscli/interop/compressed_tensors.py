"""The compressed-tensors sparse formats, written without the compressed-tensors package.

A layer's dense weight W (rows x cols, as the model stores it) becomes, under its module's name:

- `sparse-bitmask`: `compressed` (the non-zero values, row-major, 1-D), `bitmask` (uint8, rows x
  ceil(cols / 8): each row packed on its own, the first column in the lowest bit), `row_offsets`
  (int64, rows: where each row's values start) and `shape` (int64, [rows, cols]).
- `sparse-24-bitmask`: at most 2 non-zeros in every group of 4 consecutive columns; `compressed`
  holds exactly cols / 2 values per row (rows x cols/2, a kept zero where a group has fewer than 2),
  `bitmask` as above marking exactly those, `shape` (int64, 2 x 1).

One format holds for the whole model: compressed-tensors' config has one `sparsity_config`. Its
sparse compressors (0.14.0.1 the last release that ships them; 0.15 removed them) decompress both by
scattering `compressed` into the positions `bitmask` marks, so only the dense result is fixed, not
which zeros count as kept: here, like there, a value is kept when it is non-zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compresscli.codecs import codec_for
from compresscli.core.errors import CompressError

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
FORMAT_VERSION = "0.14.0.1"  # the compressed-tensors release whose compressors these tensors match
TENSORS = {BITMASK: ("compressed", "bitmask", "row_offsets", "shape"), BITMASK_24: ("compressed", "bitmask", "shape")}
_FIX = "use --format dense, which writes every method (pruned weights as zeros)"
_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)  # column j of 8 -> bit j
FORMAT = "compressed-tensors"


def refuse_codec(unit: str, codec: str) -> None:
    """Raise for a layer whose codec says it has no compressed-tensors form (fips, rps, convolutions)."""
    if FORMAT not in codec_for(codec).export_formats:
        method = codec.split("_")[0]
        raise CompressError(f"compressed-tensors has no format for {method} layers ({unit}: {codec})", _FIX)


def fits_24(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive columns of this 2-D weight holds at most 2 non-zeros."""
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def refuse_condensed(unit: str, weight: torch.Tensor, k: int) -> None:
    """A condensed layer is written only as the 2:4 layer it may be; any other fan-in is refused."""
    if not fits_24(weight):
        raise CompressError(f"compressed-tensors has no format for condensed layers that are not 2:4 "
                            f"({unit}: k={k} of {weight.shape[1]} inputs)", _FIX)


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """Bool (rows, cols) -> uint8 (rows, ceil(cols / 8)), each row padded on its own, little bit first."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8)
    padded[:, :cols] = mask
    return (padded.view(rows, -1, 8) * _BIT_VALUES).sum(-1, dtype=torch.uint8)


def encode(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """One 2-D weight's tensors in `fmt`, named relative to its module (`compressed`, `bitmask`, ...)."""
    rows, cols = weight.shape
    kept = weight != 0  # (rows, cols)
    if fmt == BITMASK:
        counts = kept.sum(1)
        return {"compressed": weight[kept], "bitmask": pack_rows(kept),
                "row_offsets": counts.cumsum(0) - counts, "shape": torch.tensor([rows, cols])}
    # 2:4: mark zeros as kept, first ones first, until every group of 4 has exactly 2
    groups = kept.reshape(rows, cols // 4, 4)
    short = 2 - groups.sum(-1, keepdim=True)  # (rows, cols/4, 1): how many zeros to add
    zero_rank = (~groups).cumsum(-1)  # 1 for a group's first zero, 2 for its second, ...
    groups = groups | (~groups & (zero_rank <= short))
    kept = groups.reshape(rows, cols)
    return {"compressed": weight[kept].reshape(rows, cols // 2), "bitmask": pack_rows(kept),
            "shape": torch.tensor([[rows], [cols]])}


@dataclass
class SparsityBlock:
    """What the `sparsity_config` in config.json says: the format, the layers written in it, and the
    fraction of their weights that are zero."""

    format: str
    targets: list[str]
    zeros: int = 0
    weights: int = 0

    def encode(self, unit: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A layer's tensors with its `weight` replaced by the format's tensors (a weight tied to one
        stored elsewhere is not among them: the layer is then no target)."""
        if f"{unit}.weight" not in tensors:
            self.targets = [t for t in self.targets if t != unit]
            return tensors
        tensors = dict(tensors)
        weight = tensors.pop(f"{unit}.weight")
        self.zeros += int((weight == 0).sum())
        self.weights += weight.numel()
        return {**tensors, **{f"{unit}.{name}": t for name, t in encode(weight, self.format).items()}}

    def quantization_config(self) -> dict:
        """The block compressed-tensors reads from config.json: its sparse-only form (no quantization)."""
        return {"quant_method": "compressed-tensors", "version": FORMAT_VERSION, "transform_config": {},
                "sparsity_config": {"format": self.format, "targets": self.targets, "ignore": [],
                                    "global_sparsity": self.zeros / max(self.weights, 1),
                                    "sparsity_structure": "2:4" if self.format == BITMASK_24 else "unstructured"}}
