"""The reload check: a saved output must hold exactly what was written, decode into layers whose two forms
compute the same function, and compute what the model in memory computed.

Three checks, from the strictest down, each naming what failed:
1. Stored tensors, bit for bit: every tensor a reloaded layer would write again (`to_tensors`, its shared
   tensors) and every plain tensor has the CRC-32 the writer recorded when it wrote it. A codec that
   decodes one value wrongly, or swaps two indices, fails here whatever the dtype.
2. The two forms of each compressed layer, in float32: the inference form (what `compresscli.load` gives:
   compiled kernels, compact structures) and the training form (dense weight and mask) are both rebuilt
   from the layer's tensors in float32 and run on the same probe input; they must agree to float32
   rounding. A kernel or a form that computes another function fails here, named.
3. The outputs in the run's dtype: the reloaded inference form against the in-memory training form, on a
   real batch. The two run different kernels (a row-sparse product against a masked dense one), so in
   bfloat16 or float16 they round differently at every layer; the tolerance is derived from the dtype's
   machine epsilon and the model's depth (`output_tolerance`), not fixed, so that a bfloat16 LLM whose
   logits reach several units passes while a model computing something else does not.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from compresscli.core.errors import CompressError
from compresscli.io.native import SHARED_PREFIX
from compresscli.codecs.base import compressed_layers
from compresscli.codecs import CompressedModule, codec_for
from compresscli.io.safetensors import checksum
from compresscli.core.precision import matmul_eps

BUG_FIX = "this is a bug in a codec; please report it with --debug output"
FLOAT32_TOLERANCE = 1e-4  # relative: float32 sums in another order differ by ~1e-6 per layer; this is slack
ROUNDING_ULPS = 3.0  # bfloat16 / float16: worst seen 1.3 eps at depth 2 (tests/test_correctness_matrix.py): 4x margin
FORMS_TOLERANCE = 1e-4  # the two forms of one layer in float32, relative to the output's largest magnitude


def output_tolerance(dtype: torch.dtype, depth: int) -> float:
    """Largest max-abs difference, relative to max(1, the largest output magnitude), that two computations of
    a `depth`-block model in `dtype` may show from rounding alone. Each layer rounds its outputs to the dtype
    (half an ulp, eps / 2), and independent roundings add up like a random walk over the blocks and the
    layers outside them (embeddings, head: one more)."""
    eps = matmul_eps(dtype)  # float32 on CUDA computes in TF32 during a run (core/precision.py)
    return max(FLOAT32_TOLERANCE, ROUNDING_ULPS * eps * math.sqrt(max(1, depth) + 1))


def check_stored(model: nn.Module, checksums: dict[str, int], include: Callable[[str], bool] = lambda n: True,
                 where: str = "the saved checkpoint",
                 encoded: dict[str, dict[str, torch.Tensor]] | None = None) -> int:
    """Check 1 (module docstring) for the layers and tensors of `model` that `include` accepts; returns how
    many tensors were compared. `encoded` holds layers' `to_tensors()` already computed (by name)."""
    compared = 0
    layers = compressed_layers(model)
    for name, layer in layers.items():
        if not include(name):
            continue
        own = (encoded or {}).get(name) or layer.to_tensors()
        stored = {f"{name}.{k}": v for k, v in own.items()}
        stored.update({SHARED_PREFIX + k: v for k, v in layer.shared_tensors().items()})
        for key, tensor in stored.items():
            compared += _compare(key, tensor, checksums, where, f"layer {name} ({layer.codec})")
    covered = tuple(f"{name}." for name in layers)
    for key, tensor in model.state_dict().items():
        if key.startswith(covered) or not include(key) or key not in checksums:  # tied copies are stored once
            continue
        compared += _compare(key, tensor, checksums, where, "a plain tensor")
    return compared


def _compare(key: str, tensor: torch.Tensor, checksums: dict[str, int], where: str, what: str) -> int:
    if key not in checksums:
        raise CompressError(f"{where}: {what} decodes to tensor {key}, which was never written", BUG_FIX)
    if checksum(tensor) != checksums[key]:
        raise CompressError(f"{where}: {what} does not decode to the bytes written for {key} (a stored value or "
                            "index changed between writing and reading)", BUG_FIX)
    return 1


def probe_input(layer: CompressedModule, rows: int = 4, seed: int = 0) -> torch.Tensor:
    """A deterministic input of the shape the layer reads: token ids for an embedding, images for a conv,
    `rows` vectors for a linear layer."""
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(layer.dense_equivalent()["weight"])
    if hasattr(layer, "num_embeddings"):
        return torch.randint(0, shape[0], (rows, 8), generator=generator)
    if len(shape) == 4:  # (out, in / groups, kh, kw)
        in_channels = getattr(layer, "in_channels", shape[1])
        return torch.randn(2, in_channels, shape[2] + 3, shape[3] + 3, generator=generator)
    return torch.randn(rows, shape[1], generator=generator)


def forms_difference(layer: CompressedModule, shared: dict[str, nn.Parameter] | None = None,
                     tensors: dict[str, torch.Tensor] | None = None) -> float:
    """Check 2 for one layer: max |inference form - training form| on the probe input, both rebuilt from the
    layer's tensors (`tensors`: its `to_tensors()`, when already computed) in float32 on the CPU, relative to
    max(1e-6, the training form's largest output magnitude). `shared` caches the float32 copies of shared
    tensors across the layers of one model."""
    shared = {} if shared is None else shared
    own = layer.to_tensors() if tensors is None else tensors
    own = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in own.items()}
    for key, tensor in layer.shared_tensors().items():
        if key not in shared:  # on the CPU whatever the run's device: this checks the codec, not a device
            shared[key] = nn.Parameter(tensor.detach().float().cpu().clone(), requires_grad=False)
    own_shared = {k: shared[k] for k in layer.shared_tensors()}
    params = layer.codec_params()
    x = probe_input(layer)
    with torch.no_grad():
        training = codec_for(layer.codec, trainable=True).from_tensors(own, params, own_shared).eval()
        inference = codec_for(layer.codec, trainable=False).from_tensors(own, params, own_shared).eval()
        expected, got = training(x).float(), inference(x).float()
    return (expected - got).abs().max().item() / max(1e-6, expected.abs().max().item())


def check_forms(layers: Iterable[tuple[str, CompressedModule]], shared: dict[str, nn.Parameter] | None = None,
                where: str = "the saved checkpoint",
                encoded: dict[str, dict[str, torch.Tensor]] | None = None) -> float:
    """Check 2 for every layer given (in model order: the first that fails is named); returns the largest
    relative difference seen."""
    worst = 0.0
    shared = {} if shared is None else shared
    for name, layer in layers:
        diff = forms_difference(layer, shared, (encoded or {}).get(name))
        if not diff <= FORMS_TOLERANCE:
            raise CompressError(f"{where}: layer {name} ({layer.codec}) computes differently in its inference "
                                f"form than in its training form (relative max diff {diff:.3g} in float32, "
                                f"tolerance {FORMS_TOLERANCE:g})", BUG_FIX)
        worst = max(worst, diff)
    return worst


def check_outputs(expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype, depth: int) -> float:
    """Check 3: the reloaded model's outputs against the in-memory model's (both as float32 tensors);
    returns the max abs difference."""
    diff = (expected - got).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    tolerance = output_tolerance(dtype, depth)
    if not diff <= tolerance * scale:
        dtype_name = str(dtype).removeprefix("torch.")
        raise CompressError(f"the saved checkpoint does not reproduce the model: max abs diff {diff:.3g} on outputs "
                            f"up to {scale:.3g}, above the {tolerance:.3g} relative tolerance of {dtype_name} at "
                            f"depth {depth} (every layer's stored tensors and both forms agreed, so the difference "
                            "lies outside the compressed layers' codecs)", BUG_FIX)
    return diff


class ReloadCheck:
    """The three checks over one saved output, visited whole (`visit(model)`) or part by part (a block at a
    time, `include` naming its tensors), then the outputs; `record()` is what the report keeps."""

    def __init__(self, checksums: dict[str, int], where: str = "the saved checkpoint"):
        self.checksums, self.where = checksums, where
        self.shared: dict[str, nn.Parameter] = {}  # float32 copies of shared tensors, for the forms check
        self.tensors = 0
        self.forms_worst = 0.0
        self.diff: float | None = None
        self.scale: float | None = None
        self.tolerance: float | None = None

    def visit(self, model: nn.Module, include: Callable[[str], bool] = lambda n: True) -> None:
        layers = [(n, layer) for n, layer in compressed_layers(model).items() if include(n)]
        encoded = {n: layer.to_tensors() for n, layer in layers}  # once, for both checks
        self.tensors += check_stored(model, self.checksums, include, self.where, encoded)
        self.forms_worst = max(self.forms_worst, check_forms(layers, self.shared, self.where, encoded))

    def outputs(self, expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype, depth: int) -> float:
        self.tolerance = output_tolerance(dtype, depth)
        self.scale = max(1.0, expected.abs().max().item())
        self.diff = check_outputs(expected, got, dtype, depth)
        return self.diff

    def record(self, examples: int) -> dict[str, float | int | None]:
        return {"max_abs_diff": self.diff, "output_scale": self.scale, "relative_tolerance": self.tolerance,
                "examples": examples,
                "tensors_compared": self.tensors, "forms_max_relative_diff": self.forms_worst}
