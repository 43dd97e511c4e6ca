"""The bookkeeping of one shared RPS memory: per slot, the sum of lambda^2 over the weights reading it.

That sum is both the normaliser of the least-squares projection and the STABLE-RPS gradient scale.
It is global (every layer sharing the memory contributes), but each layer only knows its own part,
so each layer adds its part when it is built: the sum is complete after compression and after
loading alike, where the loader rebuilds the layers one by one around the same nn.Parameter.

The gradient scaling is an identity in the forward pass whose backward divides by that sum
(`scaled_memory`), applied by every layer to the memory before its gather. Gradients are linear,
so dividing each layer's contribution equals dividing their total. Doing it inside the graph
(not with a tensor hook or in the optimiser) keeps it through deepcopy and pickling, and makes any
optimiser see the scaled gradient. Note that AdamW (the `finetune` stage) is nearly invariant to a
fixed per-slot gradient scale; the scaling matters for SGD, which is where ROAST is fragile.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

_ATTRIBUTE = "_rps_book"  # where a memory nn.Parameter keeps its book, so layers built around it find it


class _DivideGradient(torch.autograd.Function):
    """y = x; dL/dx = dL/dy / divisor (per slot)."""

    @staticmethod
    def forward(ctx: Any, memory: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(divisor)
        return memory.view_as(memory)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (divisor,) = ctx.saved_tensors
        return grad / divisor, None  # (M,)


class MemoryBook:
    """Per-slot sums of lambda^2 for one memory, and the gradient scaling that divides by them."""

    def __init__(self, size: int, scale_gradients: bool):
        self.size = size
        self.scale_gradients = scale_gradients  # STABLE-RPS on; False: plain ROAST gradients
        self.denominator = torch.zeros(size, dtype=torch.float64)  # (M,) sum_{i->j} lambda_i^2
        self._divisors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def add(self, index: torch.Tensor, scale: float) -> None:
        """Count a tensor whose weights read slots `index`, each with per-tensor scale `scale`."""
        flat = index.reshape(-1).cpu()  # index_add costs O(weights), a bincount per layer O(M)
        self.denominator.index_add_(0, flat, torch.full((flat.numel(),), float(scale) ** 2, dtype=torch.float64))
        self._divisors.clear()

    def divisor(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The denominator, 1 where no weight reads a slot (its gradient is 0 anyway), on `device`."""
        key = (device, dtype)
        if key not in self._divisors:
            d = torch.where(self.denominator > 0, self.denominator, torch.ones_like(self.denominator))
            self._divisors[key] = d.to(device=device, dtype=dtype)
        return self._divisors[key]

    def scaled_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """`memory` itself, whose gradient is divided per slot by sum lambda^2 when scaling is on."""
        if not self.scale_gradients or not (torch.is_grad_enabled() and memory.requires_grad):
            return memory
        return _DivideGradient.apply(memory, self.divisor(memory.device, memory.dtype))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_divisors": {}}  # device copies are a cache


def book_for(memory: nn.Parameter, size: int, scale_gradients: bool) -> MemoryBook:
    """The book of `memory`, created by the first layer built around it."""
    if memory.dim() != 1 or memory.numel() != size:
        raise ValueError(f"an RPS memory of shape {tuple(memory.shape)} was given where ({size},) was expected")
    book = getattr(memory, _ATTRIBUTE, None)
    if book is None:
        book = MemoryBook(size, scale_gradients)
        setattr(memory, _ATTRIBUTE, book)
    elif book.size != size or book.scale_gradients != scale_gradients:
        raise ValueError("layers sharing one RPS memory disagree on its size or on gradient scaling")
    return book
