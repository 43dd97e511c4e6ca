"""Pruning scores for the `magnitude` stage's `score` option: which weights matter most.

Each function returns {layer name: score tensor shaped like its weight}; higher means keep.
- magnitude: |theta|.
- snip (Lee et al. 2019): |theta * dL/dtheta| on calibration data.
- synflow (Tanaka et al. 2020): data-free. Weights replaced by |theta|, an all-ones input, R = sum of
  outputs; score |theta * dR/dtheta|. Applied iteratively by the caller (exponential schedule), as the
  paper prescribes, to avoid layer collapse.
- grasp (Wang et al. 2020): S = -theta * Hg (Hessian-gradient product by double backprop); GraSP
  removes the largest S, so the keep-score returned here is -S.

The loss for snip and grasp is the task's label loss when the data has labels (classifiers, LMs);
an encoder without labels has none, and the distillation loss is exactly zero with zero gradient
at the start (student == teacher), so we use the output energy 0.5 * mean(outputs^2) instead:
its gradient measures how much each weight moves the representation.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from compresscli.model.tasks import Task

Scores = dict[str, torch.Tensor]


def magnitude_scores(layers: dict[str, nn.Module]) -> Scores:
    return {n: m.weight.detach().abs() for n, m in layers.items()}


def sensitivity_loss(model: nn.Module, task: Task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = task.outputs(model, batch)
    label_loss = task.label_loss(out, batch)
    return label_loss if label_loss is not None else 0.5 * out.float().pow(2).mean()


def _weights(layers: dict[str, nn.Module]) -> list[torch.Tensor]:
    return [m.weight for m in layers.values()]


def snip_scores(model: nn.Module, layers: dict[str, nn.Module], task: Task,
                batches: list[dict[str, torch.Tensor]], device: torch.device) -> Scores:
    grads = _accumulated_grads(model, layers, lambda b: sensitivity_loss(model, task, b), batches, device)
    return {n: (m.weight.detach() * g).abs() for (n, m), g in zip(layers.items(), grads)}


def grasp_scores(model: nn.Module, layers: dict[str, nn.Module], task: Task,
                 batches: list[dict[str, torch.Tensor]], device: torch.device) -> Scores:
    """keep-score theta * Hg: GraSP removes the weights whose removal least reduces gradient flow.

    This is the paper's signed score, ranked as the authors' code ranks it (the top -theta * Hg pruned,
    one threshold over all layers). Their code also divides the logits by T=200 and re-initialises the
    Linear layers before scoring; both serve networks at initialisation and are left out.

    On a trained model the signed score is a poor pruning rule, not a bug: theta * Hg takes either sign
    about equally often, unrelated to |theta|, and pruning the weights with S > 0 is, to first order,
    the pruning that raises the gradient norm most, which near a minimum means climbing the loss. The
    damage peaks where that set is pruned whole, near 50% sparsity (digits ViT: one-shot accuracy 0.29
    at 2x, 0.55 at 30x; magnitude 0.96 and 0.58); |theta * Hg| ranks about as well as magnitude.
    """
    weights = _weights(layers)
    g = _accumulated_grads(model, layers, lambda b: sensitivity_loss(model, task, b), batches, device)
    hg = [torch.zeros_like(w) for w in weights]
    # Fused attention kernels have no double backward; the math kernel computes the same function.
    with sdpa_kernel(SDPBackend.MATH):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            grad = torch.autograd.grad(sensitivity_loss(model, task, batch), weights, create_graph=True)
            z = sum((gi * gd).sum() for gi, gd in zip(grad, g))  # g^T stop_grad(g)
            for acc, h in zip(hg, torch.autograd.grad(z, weights)):
                acc += h / len(batches)
    return {n: (w.detach() * h) for n, w, h in zip(layers, weights, hg)}


def _accumulated_grads(model: nn.Module, layers: dict[str, nn.Module], loss_fn: Callable,
                       batches: list[dict[str, torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    weights = _weights(layers)
    total = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        for acc, g in zip(total, torch.autograd.grad(loss_fn(batch), weights)):
            acc += g / len(batches)
    return total


@torch.no_grad()
def _linearise(model: nn.Module) -> None:
    """SynFlow's |theta| trick: every parameter and buffer made non-negative."""
    for p in model.state_dict().values():
        if p.is_floating_point():
            p.abs_()


def synflow_scores(model: nn.Module, layers: dict[str, nn.Module], ones_batch: dict[str, torch.Tensor],
                   task: Task) -> Scores:
    """One SynFlow evaluation, in float64 on a copy so R cannot overflow and the model is untouched."""
    names = list(layers)
    work = copy.deepcopy(model).double().eval()
    _linearise(work)
    work_layers = {n: work.get_submodule(n) for n in names}
    weights = _weights(work_layers)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in ones_batch.items()}
    r = task.outputs(work, batch).sum()
    grads = torch.autograd.grad(r, weights)
    return {n: (w.detach() * g).abs().float() for n, w, g in zip(names, weights, grads)}


def ones_like_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SynFlow's single all-ones input, shaped like one real example (for text: token id 1 everywhere)."""
    return {k: torch.ones_like(v[:1]) for k, v in batch.items() if k != "labels"}
