"""Paired metrics: the original and the compressed model on the same held-out batches.

Labelled data gives accuracy for both, their top-1 agreement and the paired difference with a
95% interval; unlabelled text gives embedding cosine to the original (encoders) or perplexity (LMs).
Metrics are accumulated batch by batch from (batch, original output, compressed output) triples, so
the same code scores two models held whole (`compare`) and two streams computed block by block (the
block-by-block runner), without keeping every output.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from compresscli.model.tasks import Batch, Task, next_token_nll

Triple = tuple[Batch, torch.Tensor | None, torch.Tensor]  # (batch, original output or None, compressed output)


@torch.no_grad()
def _outputs(original: nn.Module | None, compressed: nn.Module, task: Task, batches: list[Batch],
             device: torch.device) -> Iterable[Triple]:
    compressed.eval()
    if original is not None:
        original.eval()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out_o = task.outputs(original, batch).float() if original is not None else None
        yield batch, out_o, task.outputs(compressed, batch).float()


def compare(original: nn.Module | None, compressed: nn.Module, task: Task, batches: list[Batch],
            device: torch.device) -> dict[str, Any]:
    """Metrics for both models (original may be None: then only what needs no reference)."""
    return compare_outputs(task, _outputs(original, compressed, task, batches, device))


def compare_outputs(task: Task, triples: Iterable[Triple]) -> dict[str, Any]:
    """Metrics from per-batch outputs of the original (None when absent) and the compressed model; each
    batch is moved to its outputs' device (the block-by-block runner keeps its batches on the host)."""
    triples = (({k: v.to(out_c.device) for k, v in batch.items()}, out_o, out_c) for batch, out_o, out_c in triples)
    if task.name == "image-classification":
        return _classification(task, triples)
    if task.name == "text-encoder":
        return _encoder(task, triples)
    return _causal_lm(task, triples)


def _metric(name: str, original: float | None, compressed: float, higher_is_better: bool = True) -> dict[str, Any]:
    return {"name": name, "original": original, "compressed": compressed, "higher_is_better": higher_is_better}


def _classification(task: Task, triples: Iterable[Triple]) -> dict[str, Any]:
    preds_c, preds_o, labels = [], [], []
    for batch, out_o, out_c in triples:
        preds_c.append(out_c.argmax(-1).cpu())
        if out_o is not None:
            preds_o.append(out_o.argmax(-1).cpu())
        if "labels" in batch:
            labels.append(batch["labels"].cpu())
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


def _encoder(task: Task, triples: Iterable[Triple]) -> dict[str, Any]:
    cosines = []
    for batch, hidden_o, hidden_c in triples:
        if hidden_o is None:
            raise ValueError("embedding cosine needs the original model")
        mask = batch["attention_mask"]
        cosines.append(F.cosine_similarity(task.embed(hidden_c, mask), task.embed(hidden_o, mask), dim=-1).cpu())
    cos = torch.cat(cosines)
    return {"task": task.name, "examples": len(cos),
            "metrics": [_metric("embedding cosine to original", 1.0, cos.mean().item()),
                        _metric("worst embedding cosine", 1.0, cos.min().item())]}


def _causal_lm(task: Task, triples: Iterable[Triple]) -> dict[str, Any]:
    nll_c, nll_o, agree = [], [], []
    for batch, logits_o, logits_c in triples:
        nll_c.append(next_token_nll(logits_c, batch).cpu())
        if logits_o is not None:
            nll_o.append(next_token_nll(logits_o, batch).cpu())
            keep = batch["attention_mask"].bool()
            agree.append((logits_c.argmax(-1)[keep] == logits_o.argmax(-1)[keep]).float().cpu())
    nll = torch.cat(nll_c)
    ppl_c = math.exp(nll.mean().item())
    if not nll_o:
        return {"task": task.name, "examples": len(nll), "metrics": [_metric("perplexity", None, ppl_c, False)]}
    ppl_o = math.exp(torch.cat(nll_o).mean().item())
    return {"task": task.name, "examples": len(nll),
            "metrics": [_metric("perplexity", ppl_o, ppl_c, higher_is_better=False),
                        _metric("top-1 agreement", 1.0, torch.cat(agree).mean().item())]}
