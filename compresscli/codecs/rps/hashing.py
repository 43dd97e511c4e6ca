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
        """Slot index (int64) and sign (int8), both of the weight's `shape`, computed on the CPU."""
        return self.locate_rows(shape, torch.arange(shape[0], dtype=torch.int64))

    def locate_rows(self, shape: tuple[int, ...], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot index (int64) and sign (int8) of the weights in `rows` (first-dimension indices, any shape,
        on any device) of a `shape` weight: (*rows.shape, *shape[1:]) each. Only those rows are computed,
        so an inference layer never holds the map of its whole weight.

        Signs are a hash of each weight's global position (its flat index in the weight as stored,
        plus `offset`) for both mappers, so no two weights sharing the memory share a sign draw."""
        width = math.prod(shape[1:])
        r = rows.reshape(-1, 1).to(torch.int64)  # (n, 1)
        c = torch.arange(width, dtype=torch.int64, device=rows.device)[None, :]  # (1, width)
        positions = self.offset + r * width + c  # (n, width)
        sign = signs(positions, self.seed)
        if self.mapper == "randomfold":
            index = randomfold(positions, self.memory_size, self.seed)
        elif self.layout == "embedding":  # ROBE-Z: chunk (row, col // Z) at a hashed location, Z contiguous
            index = self._located(r, c // self.block_z, self.block_z) + c % self.block_z
        elif self.layout == "linear":  # tiles of the (in, out) view, i.e. of weight.T: r is the output
            index = (self._located(c // self.block_k, r // self.block_n, self.block_k * self.block_n)
                     + (c % self.block_k) * self.block_n + r % self.block_n)
        else:  # conv: tiles of the (out, in * kh * kw) view
            index = (self._located(r // self.block_k, c // self.block_n, self.block_k * self.block_n)
                     + (r % self.block_k) * self.block_n + c % self.block_n)
        out_shape = (*rows.shape, *shape[1:])
        return index.reshape(out_shape), sign.reshape(out_shape)

    def _located(self, x: torch.Tensor, y: torch.Tensor, extent: int) -> torch.Tensor:
        """Where the tile (or chunk) at coordinates (x, y) starts: span M - extent + 1, so that every tile
        fits without wrapping and every slot can be reached."""
        if extent > self.memory_size:
            what = "block_z" if self.layout == "embedding" else "block_k * block_n"
            raise ValueError(f"{what} = {extent} must not exceed the memory ({self.memory_size} slots); "
                             "use smaller blocks or a lower compression")
        return tile_locations(x, y, self.memory_size - extent + 1, self.seed, self.tensor_index)

    def kernel_spec(self, shape: tuple[int, ...]) -> list[int]:
        """The integers the CPU kernel computes this map from (RpsSpec in kernels/cpu_source.py, in order)."""
        extent = self.block_z if self.layout == "embedding" else self.block_k * self.block_n
        if self.mapper == "roast":
            self._located(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), extent)  # checks
        layout = {"linear": 0, "conv": 1, "embedding": 2}[self.layout]
        return [MAPPERS.index(self.mapper), layout, self.offset, shape[0], math.prod(shape[1:]), self.memory_size,
                self.block_k, self.block_n, self.block_z, max(1, self.memory_size - extent + 1),
                *coefficients(self.seed, _SIGN, 4), *coefficients(self.seed, _CHUNK, 2),
                *coefficients(self.seed, (_TILE << 32) + self.tensor_index, 3)]
