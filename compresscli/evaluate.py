"""Paired evaluation: the original and the compressed model on the same held-out batches.

Labelled data gives accuracy for both, their top-1 agreement and the paired difference with a
95% interval; unlabelled text gives embedding cosine to the original (encoders) or perplexity (LMs).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .tasks import Task, masked_mean, next_token_nll


@torch.no_grad()
def _run(model: nn.Module, task: Task, batches: list[dict[str, torch.Tensor]], device: torch.device):
    model.eval()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        yield batch, task.outputs(model, batch).float()


def compare(original: nn.Module | None, compressed: nn.Module, task: Task, batches: list[dict[str, torch.Tensor]],
            device: torch.device) -> dict[str, Any]:
    """Metrics for both models (original may be None: then only what needs no reference)."""
    if task.name == "image-classification":
        return _classification(original, compressed, task, batches, device)
    if task.name == "text-encoder":
        return _encoder(original, compressed, task, batches, device)
    return _causal_lm(original, compressed, task, batches, device)


def _metric(name: str, original: float | None, compressed: float, higher_is_better: bool = True) -> dict[str, Any]:
    return {"name": name, "original": original, "compressed": compressed, "higher_is_better": higher_is_better}


def _classification(original, compressed, task, batches, device) -> dict[str, Any]:
    preds_c, preds_o, labels = [], [], []
    for batch, logits in _run(compressed, task, batches, device):
        preds_c.append(logits.argmax(-1).cpu())
        if "labels" in batch:
            labels.append(batch["labels"].cpu())
    if original is not None:
        preds_o = [logits.argmax(-1).cpu() for _, logits in _run(original, task, batches, device)]
    pc = torch.cat(preds_c)
    po = torch.cat(preds_o) if preds_o else None
    result: dict[str, Any] = {"task": task.name, "examples": len(pc), "metrics": []}
    if labels:
        y = torch.cat(labels)
        correct_c = (pc == y).float()
        acc_o = None
        if po is not None:
            correct_o = (po == y).float()
            acc_o = correct_o.mean().item()
            diff = correct_c - correct_o  # paired: per example, +1 only compressed right, -1 only original
            half_width = 1.96 * diff.std(unbiased=True).item() / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            result["paired"] = {"delta": diff.mean().item(), "ci95": [diff.mean().item() - half_width,
                                                                      diff.mean().item() + half_width],
                                "only_original_right": int((diff < 0).sum()), "only_compressed_right": int((diff > 0).sum())}
        result["metrics"].append(_metric("accuracy", acc_o, correct_c.mean().item()))
    if po is not None:
        result["metrics"].append(_metric("top-1 agreement", 1.0, (pc == po).float().mean().item()))
    return result


def _encoder(original, compressed, task, batches, device) -> dict[str, Any]:
    if original is None:
        raise ValueError("embedding cosine needs the original model")
    cosines = []
    for (batch, hidden_c), (_, hidden_o) in zip(_run(compressed, task, batches, device),
                                                _run(original, task, batches, device)):
        emb_c = masked_mean(hidden_c, batch["attention_mask"])
        emb_o = masked_mean(hidden_o, batch["attention_mask"])
        cosines.append(F.cosine_similarity(emb_c, emb_o, dim=-1).cpu())
    cos = torch.cat(cosines)
    return {"task": task.name, "examples": len(cos),
            "metrics": [_metric("embedding cosine to original", 1.0, cos.mean().item()),
                        _metric("worst embedding cosine", 1.0, cos.min().item())]}


def _causal_lm(original, compressed, task, batches, device) -> dict[str, Any]:
    def perplexity(model):
        nll = torch.cat([next_token_nll(logits, batch).cpu() for batch, logits in _run(model, task, batches, device)])
        return math.exp(nll.mean().item()), len(nll)

    ppl_c, tokens = perplexity(compressed)
    metrics = []
    if original is not None:
        ppl_o, _ = perplexity(original)
        agree = []
        for (batch, lc), (_, lo) in zip(_run(compressed, task, batches, device), _run(original, task, batches, device)):
            keep = batch["attention_mask"].bool()
            agree.append((lc.argmax(-1)[keep] == lo.argmax(-1)[keep]).float().cpu())
        metrics.append(_metric("perplexity", ppl_o, ppl_c, higher_is_better=False))
        metrics.append(_metric("top-1 agreement", 1.0, torch.cat(agree).mean().item()))
    else:
        metrics.append(_metric("perplexity", None, ppl_c, higher_is_better=False))
    return {"task": task.name, "examples": tokens, "metrics": metrics}


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, task: Task, batch: dict[str, torch.Tensor],
                          device: torch.device) -> float:
    """Largest absolute difference between two models' outputs on one batch (the reload check)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    a.eval(), b.eval()
    return (task.outputs(a, batch).float() - task.outputs(b, batch).float()).abs().max().item()
