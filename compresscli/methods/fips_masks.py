"""How the sparsity pattern of the V_i evolves during reconstruction, global over each group's V_i.

- "rigl": every `every` steps until `until`, drop the active entries of smallest magnitude and regrow
  as many inactive ones where the gradient is largest (new entries start at zero, RigL style); the
  dropped fraction starts at `drop_fraction` and decays to zero on a cosine. Sparsity is constant.
- "gmp": gradual magnitude pruning from `initial_sparsity` to the target on a cubic schedule that
  ends at `until`; pruned entries never return.
- "fixed": the initial magnitude masks stay.

Invariant the schedule keeps: V is exactly zero wherever its mask is False. RigL relies on it to see
dense gradients: for one step it opens every mask (the product is unchanged, since those entries
are zero), so the gradient reaches inactive entries too, then closes the new masks before the step.
"""
from __future__ import annotations

import torch

from compresscli.codecs.fips.training import FipsLinear
from compresscli.methods.fips_init import magnitude_masks
from compresscli.methods.mask_schedule import UpdateSchedule, top_mask
from compresscli.training.loop import StepHooks


class MaskSchedule(StepHooks):
    def __init__(self, groups: list[list[FipsLinear]], mode: str, sparsity: float, steps: int, every: int,
                 drop_fraction: float, initial_sparsity: float, until: float):
        self.groups, self.mode, self.sparsity, self.every, self.steps = groups, mode, sparsity, every, steps
        self.initial_sparsity = initial_sparsity
        self.schedule = UpdateSchedule(every, until, drop_fraction)  # shared with condensed's updates
        self.end = self.schedule.end(steps)  # first step after which masks stay fixed
        self.edits_parameters = mode != "fixed"
        self.updates = 0
        self._open: list[torch.Tensor] | None = None

    def updating(self, step: int) -> bool:
        if self.mode == "gmp":
            return step == self.end or (0 < step < self.end and step % self.every == 0)
        return self.mode == "rigl" and self.schedule.updating(step, self.steps)

    def gmp_sparsity(self, step: int) -> float:
        """Cubic schedule s_t = s + (s_0 - s)(1 - t / end)^3 (Zhu & Gupta), reaching s at `end`."""
        progress = min(1.0, step / self.end)
        return self.sparsity + (self.initial_sparsity - self.sparsity) * (1.0 - progress) ** 3

    def before_forward(self, step: int) -> None:
        if self.mode == "rigl" and self.updating(step):
            layers = [layer for group in self.groups for layer in group]
            self._open = [layer.mask.clone() for layer in layers]
            for layer in layers:
                layer.mask.fill_(True)

    @torch.no_grad()
    def after_backward(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.updating(step):
            return
        start = 0
        for group in self.groups:
            if self.mode == "rigl":
                old = self._open[start:start + len(group)]
                new = self._regrow(group, old, step)
            else:
                old = [layer.mask.clone() for layer in group]
                new = magnitude_masks([layer.factor for layer in group], self.gmp_sparsity(step), old)
            start += len(group)
            for layer, o, n in zip(group, old, new):
                layer.mask.copy_(n)
                layer.factor.mul_(n)
                if layer.factor.grad is not None:
                    layer.factor.grad.mul_(n)
                state = optimizer.state.get(layer.factor, {})
                for key in ("exp_avg", "exp_avg_sq"):  # moments of entries that changed state restart
                    if key in state:
                        state[key].masked_fill_(o ^ n, 0.0)
        self._open = None
        self.updates += 1

    def _regrow(self, group: list[FipsLinear], old: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        active = torch.cat([m.reshape(-1) for m in old])
        magnitude = torch.cat([layer.factor.detach().abs().reshape(-1) for layer in group]).float()
        grads = [layer.factor.grad if layer.factor.grad is not None else torch.zeros_like(layer.factor)
                 for layer in group]
        gradient = torch.cat([g.abs().reshape(-1) for g in grads]).float()
        fraction = self.schedule.fraction(step, self.steps)
        n_active = int(active.sum())
        n_move = min(int(fraction * n_active), active.numel() - n_active)
        keep = top_mask(torch.where(active, magnitude, -torch.inf), n_active - n_move)
        grow = top_mask(torch.where(active, -torch.inf, gradient), n_move)
        return [piece.view_as(m) for piece, m in zip((keep | grow).split([m.numel() for m in old]), old)]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if not self.edits_parameters:  # fixed masks: the forward's masked product gives the masked entries
            return  # zero gradients, so AdamW keeps them at exactly zero (and sharded training can run)
        for group in self.groups:
            for layer in group:
                layer.factor.mul_(layer.mask)

    @torch.no_grad()
    def finish(self) -> None:
        """GMP that ran out of steps before `end` still ends at the target sparsity."""
        if self.mode != "gmp":
            return
        for group in self.groups:
            masks = magnitude_masks([layer.factor for layer in group], self.sparsity, [l.mask for l in group])
            for layer, mask in zip(group, masks):
                layer.mask.copy_(mask)
                layer.factor.mul_(mask)
