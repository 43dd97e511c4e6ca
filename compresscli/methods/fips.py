"""FiPS: Fine-grained Parameter Sharing via sparse tensor decomposition (Üyük, Lasby, Yassin, Evci,
Ioannou, arXiv 2411.09816).

Consecutive transformer blocks form groups. In a group, every MLP matrix is viewed as d x h and all
are concatenated (W_cat, d x f h n); its SVD gives one dense base U (d x r) shared by the group and a
factor V_i (r x h) per matrix, made sparse (global magnitude over the group's V_i). The rank r is the
one the budget allows (fips_init.fips_rank). Then block-wise reconstruction trains U, the V_i and the
MLP biases so that each block, fed the original previous-block output, reproduces the original block
output, while the sparsity pattern evolves (RigL or gradual magnitude pruning, see fips_masks.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from compresscli.model.architecture import Block, detect
from compresscli.core.errors import StageError
from compresscli.codecs.base import replace_module
from compresscli.codecs.fips.training import FipsLinear
from compresscli.methods.cost import Workload
from compresscli.methods.base import MethodConfig, SizeKnob, StageContext, check_training, register_method
from compresscli.methods.fips_init import build_group, kept_entries
from compresscli.methods.fips_masks import MaskSchedule
from compresscli.training.loop import TrainConfig
from compresscli.methods.reconstruct import reconstruct


@dataclass
class FipsConfig(MethodConfig):
    method = "fips"
    size_knob = SizeKnob("budget", 0.0005, 1.0, log_scale=True)
    budget: float = 0.5  # fraction of the targeted MLP weights kept: U plus the non-zeros of the V_i (biases apart)
    sparsity: float = 0.75  # fraction of each group's V_i entries removed (one global threshold per group)
    group_size: int = 4  # at most this many consecutive blocks share a base; a stage splits into equal groups
    groups: list[list[int]] | None = None  # explicit groups of block indices (0-based, model order); overrides group_size
    steps: int = 200  # block-wise reconstruction steps (0: SVD initialisation and masks only)
    lr: float = 1.0e-3  # peak learning rate of the reconstruction (AdamW, warm-up, cosine decay)
    weight_decay: float = 0.0  # AdamW decoupled decay during reconstruction
    warmup: float = 0.05  # fraction of the steps with linear warm-up
    batch_size: int = 8  # calibration examples per reconstruction step
    mask_update: Literal["rigl", "gmp", "fixed"] = "fixed"  # how the V_i's sparsity pattern evolves (fips_masks.py)
    update_every: int = 20  # steps between mask updates
    drop_fraction: float = 0.3  # rigl: fraction of active entries dropped and regrown at the first update, cosine-decayed
    initial_sparsity: float = 0.5  # gmp only: sparsity of the V_i at the start, raised to `sparsity` on a cubic schedule
    mask_until: float = 0.75  # fraction of the steps after which the masks stay fixed
    format: Literal["auto", "bitmask", "csr"] = "auto"  # storage of the V_i; auto takes whichever is smaller

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise StageError(f"budget must be in (0, 1] (the fraction of the MLP weights kept), got {self.budget}")
        if not 0.0 <= self.sparsity < 1.0:
            raise StageError(f"sparsity must be in [0, 1) (the fraction of V removed), got {self.sparsity}")
        if self.group_size < 1:
            raise StageError(f"group_size must be >= 1, got {self.group_size}")
        if self.groups is not None and (not self.groups or any(not g for g in self.groups)):
            raise StageError(f"groups must be a non-empty list of non-empty lists of block indices, got {self.groups}")
        check_training(self)
        if self.update_every < 1:
            raise StageError(f"update_every must be >= 1, got {self.update_every}")
        if not 0.0 <= self.drop_fraction < 1.0:
            raise StageError(f"drop_fraction must be in [0, 1), got {self.drop_fraction}")
        if self.mask_update == "gmp" and not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise StageError(f"initial_sparsity must be in [0, sparsity={self.sparsity}], got {self.initial_sparsity}")
        if not 0.0 < self.mask_until <= 1.0:
            raise StageError(f"mask_until must be in (0, 1], got {self.mask_until}")

    def needs_data(self) -> bool:
        return self.steps > 0

    def needs_original(self) -> bool:
        return self.steps > 0

    def resident_bytes(self, work: Workload) -> int:
        factors = int(work.weights * (self.budget / max(1e-6, 1 - self.sparsity) + 0.05))
        return factors * (work.value_bytes + 1) - work.weights * work.value_bytes

    def working_bytes(self, work: Workload) -> int:
        """U and the V_i kept dense with their masks (about budget / (1 - sparsity) of the targets), the
        SVD of a group in float32, and when training: the optimiser over U and V, autograd's activations
        for a chunk through the group's blocks, and (whole-model runs) the captured block inputs and outputs."""
        factors = int(work.weights * (self.budget / max(1e-6, 1 - self.sparsity) + 0.05))
        group = work.weights * self.group_size // max(self.group_size, work.blocks)
        total = factors * (work.value_bytes + 1) + 12 * group
        if self.steps > 0:
            tokens = self.batch_size * work.seq_len
            total += work.optimiser(factors * work.value_bytes) + work.activations(tokens) // 2
            if work.captures:
                total += 2 * work.calibration_tokens * work.width * work.value_bytes * work.blocks
        return total

    def sweep_recovery(self, steps: int, lr: float) -> tuple[dict[str, Any], int]:
        """Its block-wise reconstruction is recovery too: half the budget there, the finetune the rest."""
        return {"steps": steps // 2}, steps - steps // 2

    def calibration_chunk(self) -> int | None:
        return self.batch_size

    def block_units(self, blocks: list[Block]) -> list[list[int]]:
        return [[b.index for b in group] for group in plan_groups(blocks, self.group_size, self.groups)]

    def reconstruction(self) -> TrainConfig:
        return TrainConfig(self.steps, self.lr, self.weight_decay, self.warmup)


def targeted_blocks(model: nn.Module, selected: dict[str, nn.Module]) -> list[Block]:
    """The blocks whose MLP layers are all selected; anything else selected is an error."""
    arch = detect(model)
    if not arch.blocks:
        raise StageError(f"fips needs transformer blocks with an MLP, and none were found in this {arch.family} model")
    owner = {layer.name: block for block in arch.blocks for layer in block.mlp}
    stray = [name for name in selected if name not in owner]
    if stray:
        raise StageError(f"fips compresses only the MLP layers of whole blocks, but the targets include "
                         f"{', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''} (use targets: [mlp])")
    blocks = []
    for block in arch.blocks:
        chosen = [layer.name for layer in block.mlp if layer.name in selected]
        if not chosen:
            continue
        if len(chosen) < len(block.mlp):
            missing = [layer.name for layer in block.mlp if layer.name not in selected]
            raise StageError(f"block {block.name}: fips shares a base across all of a block's MLP layers, but "
                             f"{', '.join(missing)} is not targeted")
        for name in chosen:
            layer = selected[name]
            if isinstance(layer, FipsLinear):
                raise StageError(f"{name} is already compressed by fips")
            if type(layer) is not nn.Linear:
                raise StageError(f"{name} is a {type(layer).__name__}, not a dense Linear: fips must come before "
                                 "any other compression of the MLP layers")
        blocks.append(block)
    return blocks


def plan_groups(blocks: list[Block], group_size: int, explicit: list[list[int]] | None) -> list[list[Block]]:
    """Groups of blocks that share a base. By default each run of consecutive blocks of one stage splits
    into the fewest groups of at most `group_size`, as equal as possible (6 blocks, size 4: 3 + 3)."""
    by_index = {b.index: b for b in blocks}
    if explicit is not None:
        flat = [i for group in explicit for i in group]
        unknown = sorted(set(flat) - set(by_index))
        if unknown:
            raise StageError(f"groups name blocks {unknown} whose MLPs are not targeted "
                             f"(targeted blocks: {sorted(by_index)})")
        if len(flat) != len(set(flat)) or set(flat) != set(by_index):
            raise StageError(f"groups must name every targeted block exactly once (targeted: {sorted(by_index)}, "
                             f"groups: {explicit})")
        groups = [[by_index[i] for i in group] for group in explicit]
        for group in groups:
            if len({b.stage for b in group}) > 1:
                raise StageError(f"group {[b.index for b in group]} crosses a change of width (blocks of different "
                                 "stages); keep each group inside one stage")
        return groups
    runs: list[list[Block]] = []
    for block in blocks:
        if runs and runs[-1][-1].stage == block.stage and runs[-1][-1].index == block.index - 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    groups = []
    for run in runs:
        count = math.ceil(len(run) / group_size)
        sizes = [len(run) // count + (1 if k < len(run) % count else 0) for k in range(count)]
        start = 0
        for size in sizes:
            groups.append(run[start:start + size])
            start += size
    return groups


@register_method(FipsConfig, "FiPS: MLPs of block groups share an SVD base U, sparse per-layer V_i, block-wise reconstruction")
def fips(model: nn.Module, selected: dict[str, nn.Module], config: FipsConfig, ctx: StageContext) -> dict[str, Any]:
    groups = plan_groups(targeted_blocks(model, selected), config.group_size, config.groups)
    training = config.steps > 0 and not ctx.dry_run
    mask_sparsity = config.initial_sparsity if training and config.mask_update == "gmp" else config.sparsity
    built: list[list[FipsLinear]] = []
    ranks, weights = [], 0
    for group in groups:
        layers = [(layer.name, model.get_submodule(layer.name), layer.orientation) for b in group for layer in b.mlp]
        weights += sum(linear.weight.numel() for _, linear, _ in layers)
        new, rank = build_group(layers, config.budget, config.sparsity, mask_sparsity, f"fips.{group[0].name}.base")
        for (name, _, _), layer in zip(layers, new):
            layer.storage_format = config.format
            replace_module(model, name, layer)
        built.append(new)
        ranks.append(rank)
    stats: dict[str, Any] = {"groups": [[b.name for b in g] for g in groups], "ranks": ranks, "weights": weights}
    if training:
        schedule = MaskSchedule(built, config.mask_update, config.sparsity, config.steps, config.update_every,
                                config.drop_fraction, config.initial_sparsity, config.mask_until)
        params = {id(p): p for group in built for layer in group for p in layer.parameters()}
        block_names = [b.name for g in groups for b in g]
        stats["reconstruction"] = reconstruct(model, block_names, list(params.values()), ctx,
                                              config.reconstruction(), config.batch_size, schedule,
                                              label="fips reconstruction")
        stats["mask_updates"] = schedule.updates
    kept = sum(g[0].base.numel() + sum(int(layer.mask.sum()) for layer in g) for g in built)
    planned = sum(g[0].base.numel() + kept_entries(r, sum(l.hidden for l in g), config.sparsity)
                  for g, r in zip(built, ranks))
    stats.update({"kept": kept, "planned_kept": planned, "kept_ratio": kept / weights,
                  "v_sparsity": 1 - sum(int(l.mask.sum()) for g in built for l in g)
                  / sum(l.mask.numel() for g in built for l in g)})
    return stats
