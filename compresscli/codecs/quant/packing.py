"""Sub-byte codes packed into bytes, the layout compressed-tensors' `pack_to_int32` writes.

Each row of codes is one little-endian bitstream: code j of a row at bits j*b .. j*b + b - 1, stored as
offset binary (code + 2^(b-1), so 0 .. 2^b - 1), the row padded with zero bits to a whole byte. int4: the
even column in the low nibble (what torch's int4 CPU kernel reads as nibbles); int3: 8 codes in 3 bytes
(0.375 bytes a code, against 0.5 in nibbles: the reason to choose int3 is bytes); int2: 4 a byte. When
cols * b is a multiple of 32, a packed row viewed as int32 is exactly compressed-tensors' packed row; else
ours is its prefix (they pad each row to 4 bytes). int8 codes are stored as they are (two's complement).
"""
from __future__ import annotations

import torch


def row_bytes(cols: int, bits: int) -> int:
    """Bytes one packed row of `cols` codes takes."""
    return cols if bits == 8 else (cols * bits + 7) // 8


def _unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte run: 8 codes in 3 bytes for int3, else one byte."""
    return (8, 3) if bits == 3 else (8 // bits, 1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (rows, cols) int8 -> (rows, row_bytes(cols, bits)): int8 as it is, else packed uint8."""
    if bits == 8:
        return codes.to(torch.int8).contiguous()
    rows, cols = codes.shape
    per, unit_bytes = _unit(bits)
    units = -(-cols // per)
    offset = (codes.to(torch.int32) + (1 << (bits - 1)))
    offset = torch.nn.functional.pad(offset, (0, units * per - cols)).view(rows, units, per)  # pad: zero bits
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    words = (offset << shifts).sum(-1, dtype=torch.int32)  # (rows, units): disjoint bit fields, so sum == or
    if unit_bytes > 1:
        words = torch.stack([(words >> (8 * k)) & 0xFF for k in range(unit_bytes)], -1).view(rows, -1)
    return words.to(torch.uint8)[:, :row_bytes(cols, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack`: (rows, row_bytes(cols, bits)) -> signed codes (rows, cols) int8."""
    if bits == 8:
        return packed.view(torch.int8) if packed.dtype == torch.uint8 else packed
    rows, stored = packed.shape
    per, unit_bytes = _unit(bits)
    if unit_bytes == 1:  # int4 / int2: whole codes per byte, split in uint8 (4x fewer bytes moved than in int32)
        fields = torch.stack([(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], -1)
        return (fields.view(rows, stored * per)[:, :cols].to(torch.int8) - (1 << (bits - 1))).contiguous()
    units = -(-cols // per)
    bytes_ = torch.nn.functional.pad(packed.to(torch.int32), (0, units * unit_bytes - stored))
    bytes_ = bytes_.view(rows, units, unit_bytes)
    words = bytes_[..., 0]
    for k in range(1, unit_bytes):
        words = words | (bytes_[..., k] << (8 * k))
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    offset = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (offset.view(rows, units * per)[:, :cols] - (1 << (bits - 1))).to(torch.int8)
