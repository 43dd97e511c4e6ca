"""Where every weight of a randomized-parameter-sharing layer lives in the shared memory, and its sign.

The map is never stored: it is recomputed from a few integers (memory size, seed, offsets, tile
sizes), so it must come out identical on every machine and device. Everything here is therefore
plain integer arithmetic that we control: hash coefficients come from splitmix64 (Python ints),
and hashes are polynomials modulo the Mersenne prime 2^31 - 1 evaluated in int64 on the CPU,
where no intermediate product exceeds 2^62. No torch RNG is involved.

Mappers (names as recipes spell them):
- `randomfold` (STABLE-RPS): all targeted weights are flattened to global positions p; position p
  lands in chunk q = p // M at offset o = p - qM, and h(p) = (hash(q) + o) mod M. Each chunk is a
  rotation of the memory, so the map is injective when M >= n and every slot gets floor(n/M) or
  ceil(n/M) weights otherwise.
- `roast` (ROAST): a matrix is cut into block_k x block_n tiles; a tile sits at a hash of its tile
  coordinates and its elements are contiguous there. Embeddings (ROBE-Z) hash (row, col // Z).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

PRIME = 2**31 - 1  # Mersenne prime: operands stay below 2^31, products below 2^62 (no int64 overflow)
MASK64 = 2**64 - 1
Kind = Literal["linear", "conv", "embedding"]
MAPPERS = ("randomfold", "roast")


def splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele et al.): a fixed, well-mixed 64-bit integer function."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def coefficients(seed: int, stream: int, count: int) -> list[int]:
    """`count` hash coefficients in [1, PRIME) for one (seed, stream); non-zero so no term vanishes."""
    state = splitmix64((seed & MASK64) ^ splitmix64(stream))
    out = []
    for _ in range(count):
        state = splitmix64(state)
        out.append(1 + state % (PRIME - 1))
    return out


def poly_hash(x: torch.Tensor, coeffs: list[int]) -> torch.Tensor:
    """(c_0 x^d + ... + c_d) mod PRIME by Horner's rule, for int64 `x` (reduced mod PRIME first)."""
    x = x % PRIME
    h = torch.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        h = (h * x + c) % PRIME
    return h


# Streams keep the hash families of one seed independent of each other.
_CHUNK, _SIGN, _TILE = 1, 2, 3


def signs(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """+-1 (int8) per global position, from a degree-3 polynomial hash (4-wise independent family)."""
    return (1 - 2 * (poly_hash(positions, coefficients(seed, _SIGN, 4)) & 1)).to(torch.int8)


def randomfold(positions: torch.Tensor, memory_size: int, seed: int) -> torch.Tensor:
    """h(p) = (hash(p // M) + p mod M) mod M: a rotation of the memory per chunk of M positions."""
    chunk = positions // memory_size
    offset = positions - chunk * memory_size
    return (poly_hash(chunk, coefficients(seed, _CHUNK, 2)) + offset) % memory_size


def tile_locations(rows: torch.Tensor, cols: torch.Tensor, span: int, seed: int, tensor_index: int) -> torch.Tensor:
    """((a x + b y + c) mod P) mod span for tile coordinates (x, y), one hash family per tensor."""
    a, b, c = coefficients(seed, (_TILE << 32) + tensor_index, 3)
    return ((a * (rows % PRIME) + b * (cols % PRIME) + c) % PRIME) % span


@dataclass(frozen=True)
class Placement:
    """Everything that fixes one tensor's map into a memory (JSON-able: it goes in codec params).

    Layers whose weights are one tied tensor (an embedding and the LM head reading it) get the same
    Placement, layout included, so they read the same slots with the same signs."""

    memory_size: int  # M, slots of the shared memory
    mapper: Literal["randomfold", "roast"]
    seed: int
    offset: int  # global position of this tensor's first weight among all weights sharing the memory
    tensor_index: int  # order of this tensor among them (0: the first)
    layout: Kind = "linear"  # roast: how the tensor is cut into tiles (the owner's type, also for a tied partner)
    block_k: int = 32  # roast: tile rows (input features; conv: output channels)
    block_n: int = 32  # roast: tile columns (output features; conv: in * kh * kw)
    block_z: int = 32  # roast: chunk length Z of embedding rows (ROBE-Z)

    def __post_init__(self) -> None:
        if self.mapper not in MAPPERS:
            raise ValueError(f"unknown RPS mapper {self.mapper!r}; one of {', '.join(MAPPERS)}")
        if self.memory_size < 1:
            raise ValueError(f"an RPS memory needs at least one slot, got {self.memory_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def locate(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot index (int64) and sign (int8), both of the weight's `shape`, computed on the CPU.

        Signs are a hash of each weight's global position (its flat index in the weight as stored,
        plus `offset`) for both mappers, so no two weights sharing the memory share a sign draw."""
        numel = math.prod(shape)
        positions = self.offset + torch.arange(numel, dtype=torch.int64)
        sign = signs(positions, self.seed).view(shape)
        if self.mapper == "randomfold":
            return randomfold(positions, self.memory_size, self.seed).view(shape), sign
        if self.layout == "embedding":
            index = self._robe(shape[0], numel // shape[0])
        elif self.layout == "linear":  # tiles of the (in, out) view, i.e. of weight.T
            index = self._tiles(shape[1], shape[0]).t()
        else:  # conv: tiles of the (out, in * kh * kw) view
            index = self._tiles(shape[0], numel // shape[0])
        return index.contiguous().view(shape), sign

    def _tiles(self, rows: int, cols: int) -> torch.Tensor:
        """(rows, cols) slots: tile (x, y) at a hashed location, its elements contiguous there."""
        tile = self.block_k * self.block_n
        if tile > self.memory_size:
            raise ValueError(f"block_k * block_n = {tile} must not exceed the memory ({self.memory_size} slots); "
                             "use smaller blocks or a lower compression")
        r = torch.arange(rows, dtype=torch.int64)[:, None]
        c = torch.arange(cols, dtype=torch.int64)[None, :]
        # span M - tile + 1: every tile fits without wrapping and every slot can be reached
        loc = tile_locations(r // self.block_k, c // self.block_n, self.memory_size - tile + 1, self.seed,
                             self.tensor_index)
        return loc + (r % self.block_k) * self.block_n + (c % self.block_n)

    def _robe(self, rows: int, cols: int) -> torch.Tensor:
        """(rows, cols) slots: chunk (row, col // Z) at a hashed location, Z elements contiguous (ROBE-Z)."""
        if self.block_z > self.memory_size:
            raise ValueError(f"block_z = {self.block_z} must not exceed the memory ({self.memory_size} slots); "
                             "use a smaller block_z or a lower compression")
        r = torch.arange(rows, dtype=torch.int64)[:, None]
        c = torch.arange(cols, dtype=torch.int64)[None, :]
        loc = tile_locations(r, c // self.block_z, self.memory_size - self.block_z + 1, self.seed, self.tensor_index)
        return loc + c % self.block_z
