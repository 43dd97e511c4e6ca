"""Randomized parameter sharing: ROAST (Desai & Shrivastava, "Efficient model compression via random
operation access specific tile hashing") and STABLE-RPS (Desai & Shrivastava, "In defense of
parameter sharing for model-compression", ICLR 2024), projected from a pretrained checkpoint.

Every targeted weight (Linear, Conv2d, Embedding; biases and norms stay dense) is read from one
memory m of M = floor(n / c) slots as w_i = lambda_t * g_i * m[h(i)] (modules/rps.py). The memory
starts at the least-squares optimum for the fixed map: minimising sum_i (lambda_i g_i m_h(i) - w_i)^2
slot by slot gives m_j = sum_{i->j} lambda_i g_i w_i / sum_{i->j} lambda_i^2 (0 for an empty slot).

The per-tensor scale is lambda_t = rms(w_t) / (rms(all targeted weights) * memory_scale): tensors of
different natural scales (embeddings, attention, MLP) share slots on an equal footing, and the memory
holds values of the weights' own scale (times memory_scale), so the learning rates that suit the dense
model suit the memory. `memory_scale` changes nothing in the function (the projection absorbs it);
it is the init-scale knob of the STABLE-RPS paper: under SGD, plain ROAST gradients make the effective
step on w proportional to lambda^2 (1 / memory_scale^2), STABLE-RPS's per-slot division by
sum lambda^2 removes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compresscli.model.architecture import block_names_of
from compresscli.core.errors import StageError
from compresscli.codecs.base import replace_module
from compresscli.codecs import CompressedModule
from compresscli.codecs.rps.training import RPSConv2d, RPSEmbedding, RPSLinear
from compresscli.codecs.rps.hashing import MAPPERS, Placement
from compresscli.methods.cost import Workload
from compresscli.methods.base import MethodConfig, SizeKnob, StageContext, leaf_layers, register_method

LAYOUTS = {nn.Linear: "linear", nn.Conv2d: "conv", nn.Embedding: "embedding"}


@dataclass
class RPSConfig(MethodConfig):
    method = "rps"
    block_by_block_params = {"scope": "block"}
    size_knob = SizeKnob("compression", 1.0, 10000.0, log_scale=True)
    default_targets = ("linear",)  # every Linear but the classifier head; add `embeddings` for text models
    compression: float = 10.0  # factor c: the memory has floor(n / c) slots for the n targeted weights
    mapper: Literal["randomfold", "roast"] = "randomfold"  # STABLE-RPS's fold (a bijection at c = 1) or ROAST tiles
    block_k: int = 32  # roast: tile rows (in-features of a Linear, out-channels of a Conv2d)
    block_n: int = 32  # roast: tile columns (out-features; conv: in * kh * kw)
    block_z: int = 32  # roast: chunk length Z of embedding rows (ROBE-Z)
    seed: int = 0  # fixes the map and the signs; the map is recomputed from it on load, never stored
    scale_gradients: bool = True  # STABLE-RPS gradient scaling; False gives plain ROAST gradients
    memory_scale: float = 1.0  # memory values relative to the weights' RMS (lambda shrinks by as much)
    scope: Literal["model", "block"] = "model"  # one memory for every targeted layer, or one per block

    def __post_init__(self) -> None:
        if not (isinstance(self.compression, (int, float)) and math.isfinite(self.compression) and self.compression >= 1):
            raise StageError(f"compression must be a number >= 1 (memory = targeted weights / compression), "
                             f"got {self.compression}")
        if self.mapper not in MAPPERS:
            raise StageError(f"mapper must be one of {', '.join(MAPPERS)}, got {self.mapper!r}")
        for name in ("block_k", "block_n", "block_z"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise StageError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise StageError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not (isinstance(self.memory_scale, (int, float)) and self.memory_scale > 0 and math.isfinite(self.memory_scale)):
            raise StageError(f"memory_scale must be a number > 0, got {self.memory_scale}")

    def needs_data(self) -> bool:
        return False

    def resident_bytes(self, work: Workload) -> int:
        slots = int(work.weights / self.compression)
        return work.weights * 9 + slots * work.value_bytes - work.weights * work.value_bytes

    def working_bytes(self, work: Workload) -> int:
        """The map kept per weight (int64 slot index, int8 sign), the float64 projection accumulators per
        memory slot, and the memory itself."""
        slots = int(work.weights / self.compression)
        return work.weights * 9 + slots * (16 + work.value_bytes) + 16 * work.largest_layer

    def whole_model_only(self) -> str | None:
        if self.scope == "model":
            return "scope model shares one memory across every targeted layer; use scope: block (one memory per block)"
        return None


def sharable_layers(model: nn.Module, selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The selected dense Linear / Conv2d / Embedding layers; anything already compressed is an error."""
    for name, module in selected.items():
        inner = [module] + [m for m in module.modules() if m is not module]
        done = next((m for m in inner if isinstance(m, CompressedModule)), None)
        if done is not None:
            raise StageError(f"{name} is already compressed ({done.codec}); rps reads dense Linear, Conv2d "
                             "and Embedding weights, so put the rps stage first or target other layers")
    layers = leaf_layers(selected, tuple(LAYOUTS), "Linear, Conv2d or Embedding layer")
    for name, layer in layers.items():
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise StageError(f"{name}: padding_mode {layer.padding_mode!r} is not supported by rps (only 'zeros')")
        if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.sparse):
            raise StageError(f"{name}: embeddings with max_norm or sparse gradients are not supported by rps")
    return layers


def tied_partners(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """Layers (targeted or not) whose weight is the very Parameter of a targeted layer -> that layer.

    An LM head tied to a targeted embedding must read the same memory slots, or the checkpoint would
    keep a dense copy of the tensor it meant to compress (and untie it)."""
    owner: dict[int, str] = {}
    for name, layer in layers.items():
        owner.setdefault(id(layer.weight), name)
    partners = {}
    for name, module in model.named_modules():
        if isinstance(module, tuple(LAYOUTS)) and id(module.weight) in owner and owner[id(module.weight)] != name:
            partners[name] = owner[id(module.weight)]
    return partners


def tensor_scales(weights: dict[str, torch.Tensor], memory_scale: float) -> dict[str, float]:
    """lambda_t = rms(w_t) / (rms of all the weights * memory_scale); 1 / memory_scale for an all-zero tensor."""
    total = sum(float(w.double().pow(2).sum()) for w in weights.values())
    count = sum(w.numel() for w in weights.values())
    overall = math.sqrt(total / count) if total > 0 else 1.0
    scales = {}
    for name, w in weights.items():
        rms = float(w.double().pow(2).mean().sqrt())
        scales[name] = (rms if rms > 0 else overall) / (overall * memory_scale)
    return scales


def _memory_name(model: nn.Module, stem: str = "rps") -> str:
    """`STEM.K.memory` for the K-th memory of that stem (a second rps stage gets its own memory)."""
    names = {m.memory_name for m in model.modules() if isinstance(m, (RPSLinear, RPSConv2d, RPSEmbedding))}
    k = 0
    while f"{stem}.{k}.memory" in names:
        k += 1
    return f"{stem}.{k}.memory"


def _build(layer: nn.Module, memory: nn.Parameter, name: str, placement: Placement, scale: float,
           config: RPSConfig, counted: bool) -> nn.Module:
    bias = getattr(layer, "bias", None)
    shared = dict(memory=memory, memory_name=name, placement=placement, scale=scale,
                  scale_gradients=config.scale_gradients, bias=bias, counted=counted)
    if isinstance(layer, nn.Linear):
        return RPSLinear(layer.in_features, layer.out_features, **shared)
    if isinstance(layer, nn.Conv2d):
        return RPSConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, **shared)
    return RPSEmbedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, **shared)


def share_(model: nn.Module, layers: dict[str, nn.Module], config: RPSConfig, stem: str = "rps") -> dict[str, Any]:
    """Replace `layers` by RPS layers over one new memory, projected from their weights. In place."""
    partners = tied_partners(model, layers)
    owners = {n: l for n, l in layers.items() if n not in partners}  # one per distinct weight tensor
    weights = {n: l.weight.detach() for n, l in owners.items()}
    n = sum(w.numel() for w in weights.values())
    size = math.floor(n / config.compression)
    if size < 1:
        raise StageError(f"compression {config.compression:g} leaves no memory for {n} weights; use at most {n}")
    if config.mapper == "roast":
        tile = max(config.block_k * config.block_n, config.block_z)
        if tile > size:
            raise StageError(f"the memory has {size} slots, fewer than one roast tile ({tile}); "
                             "lower compression or block_k / block_n / block_z")
    first = next(iter(weights.values()))
    memory = nn.Parameter(torch.zeros(size, dtype=first.dtype, device=first.device))
    name = _memory_name(model, stem)
    scales = tensor_scales(weights, config.memory_scale)

    built: dict[str, nn.Module] = {}
    offset = 0
    for t, (layer_name, layer) in enumerate(owners.items()):
        placement = Placement(size, config.mapper, config.seed, offset, t, LAYOUTS[type(layer)],
                              config.block_k, config.block_n, config.block_z)
        built[layer_name] = _build(layer, memory, name, placement, scales[layer_name], config, counted=True)
        offset += layer.weight.numel()
    for layer_name, owner in partners.items():
        layer = model.get_submodule(layer_name)
        built[layer_name] = _build(layer, memory, name, built[owner].placement, float(built[owner].weight_scale),
                                   config, counted=False)

    # least squares per slot: m_j = sum lambda g w / sum lambda^2, in float64
    book = built[next(iter(owners))].book
    numerator = torch.zeros(size, dtype=torch.float64, device=memory.device)
    loads = torch.zeros(size, dtype=torch.int64)
    for layer_name, w in weights.items():
        rps = built[layer_name]
        lam = float(rps.weight_scale)
        numerator.index_add_(0, rps.index.reshape(-1), (w.double() * rps.sign.double() * lam).reshape(-1))
        loads.index_add_(0, rps.index.reshape(-1).cpu(), torch.ones(rps.index.numel(), dtype=torch.int64))
    denominator = book.denominator.to(memory.device)
    with torch.no_grad():
        memory.copy_(torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), 0.0))
        error = sum(float((built[k].weight.double() - w.double()).pow(2).sum()) for k, w in weights.items())
        power = sum(float(w.double().pow(2).sum()) for w in weights.values())

    for layer_name, rps in built.items():
        replace_module(model, layer_name, rps)
    return {"layers": len(built), "tied": sorted(partners), "weights": n, "memory": size, "memory_name": name,
            "compression": n / size, "mapper": config.mapper, "scale_gradients": config.scale_gradients,
            "slot_load_min": int(loads.min()), "slot_load_max": int(loads.max()),
            "empty_slots": int((loads == 0).sum()),
            "projection_rel_error": math.sqrt(error / power) if power > 0 else 0.0}


@register_method(RPSConfig, "randomized parameter sharing (ROAST / STABLE-RPS): all targeted weights read one "
                            "shared memory through a seeded hash, projected by least squares")
def rps(model: nn.Module, selected: dict[str, nn.Module], config: RPSConfig, ctx: StageContext) -> dict[str, Any]:
    layers = sharable_layers(model, selected)
    if config.scope == "model":
        return share_(model, layers, config)
    groups: dict[str, dict[str, nn.Module]] = {}
    for name, block in block_names_of(model, list(layers)).items():
        groups.setdefault(block, {})[name] = layers[name]
    per_block = {block: share_(model, group, config, stem=f"rps.{block}") for block, group in groups.items()}
    weights, memory = sum(s["weights"] for s in per_block.values()), sum(s["memory"] for s in per_block.values())
    return {"layers": sum(s["layers"] for s in per_block.values()), "memories": len(per_block), "weights": weights,
            "memory": memory, "compression": weights / memory, "mapper": config.mapper,
            "scale_gradients": config.scale_gradients,
            "projection_rel_error": max(s["projection_rel_error"] for s in per_block.values())}
