"""Statistics of layers' inputs on calibration data, accumulated in forward hooks without keeping the
inputs: per input channel the sum of squares (Wanda's ||X_j||, condensed's activation score) and,
when asked, the Gram matrix X^T X (SparseGPT's Hessian). One implementation for every method that
scores or solves with calibration data.

Every token position counts, padding included (a chunk's padding columns that no example needs are
already cut by calibration.split_batches); a Conv2d's inputs are its unfolded patches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compresscli.methods.calibration import Calibrator
from compresscli.core.errors import StageError
from compresscli.core.precision import exact_float32


@dataclass
class InputStats:
    """Running statistics of one layer's inputs (rows of X are positions, columns input channels)."""

    count: int = 0
    squares: torch.Tensor | None = None  # (in,) float64: sum over positions of x_j^2
    gram: torch.Tensor | None = None  # (in, in) float32: sum of x x^T, when kept

    def add(self, x: torch.Tensor, keep_gram: bool) -> None:
        x = x.reshape(-1, x.shape[-1])  # (positions, in)
        self.count += x.shape[0]
        squares = x.double().pow(2).sum(0)
        self.squares = squares if self.squares is None else self.squares + squares
        if keep_gram:
            xf = x.float()
            with exact_float32():  # the solver's Hessian: never TF32
                gram = xf.t() @ xf
            self.gram = gram if self.gram is None else self.gram.add_(gram)

    def norms(self) -> torch.Tensor:
        """||X_j||_2 per input channel."""
        return self.squares.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """H = 2/n X^T X, the Hessian of the layer's squared output error (SparseGPT)."""
        return self.gram * (2.0 / max(1, self.count))


def layer_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of input channels: a Linear's last dimension, a Conv2d's unfolded patches."""
    if isinstance(layer, nn.Conv2d) or hasattr(layer, "kernel_size"):
        x = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, C*kh*kw, L)
        return x.transpose(1, 2)
    return x


def collect(model: nn.Module, layers: dict[str, nn.Module], calibrator: Calibrator, keep_gram: bool = False,
            stop_after: nn.Module | None = None) -> dict[str, InputStats]:
    """Run the calibration data once with hooks on `layers`; their input statistics."""
    stats = {name: InputStats() for name in layers}

    def hook(name: str, layer: nn.Module):
        def record(_module, args):
            stats[name].add(layer_inputs(layer, args[0].detach()), keep_gram)
        return record

    handles = [layer.register_forward_pre_hook(hook(n, layer)) for n, layer in layers.items()]
    try:
        with torch.no_grad():
            calibrator.run(model, stop_after=stop_after)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n, s in stats.items() if s.count == 0]
    if missing:
        raise StageError(f"the calibration data never reached {', '.join(missing[:3])}")
    return stats


def forward_groups(model: nn.Module, layers: dict[str, nn.Module], calibrator: Calibrator) -> list[list[str]]:
    """The layers in the order the forward reaches them, those reading the very same input tensor
    grouped (q/k/v, gate/up): solving group by group, each group's inputs come from the layers before
    it already compressed (sequential error propagation), one calibration pass per group."""
    order: list[tuple[str, bool]] = []  # (layer, whether it reads the same tensor as the layer before it)
    previous: list[torch.Tensor] = []  # the last input seen, kept alive so identity comparisons are sound

    def hook(name: str):
        def record(_module, args):
            if all(n != name for n, _ in order):
                order.append((name, bool(previous) and args[0] is previous[0]))
            previous[:] = [args[0]]
        return record

    handles = [layer.register_forward_pre_hook(hook(n)) for n, layer in layers.items()]
    try:
        with torch.no_grad():
            calibrator.run(model, stop_after=None, limit=1)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name, same_input in order:
        if groups and same_input:
            groups[-1].append(name)
        else:
            groups.append([name])
    unreached = [n for n in layers if all(n != o for o, _ in order)]
    if unreached:
        raise StageError(f"the calibration data never reached {', '.join(unreached[:3])}")
    return groups
