"""How to run a model on a batch, and how its outputs are compared with the original's.

A task is chosen from the model's kind and class: image classifiers (timm), text encoders
(BERT-style base models, compared by sentence embedding) and causal language models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers' mean pooling: mean over real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, C)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """A sentence embedding (B, C) from token states (B, T, C), as sentence-transformers pools them."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(1)
    return masked_mean(hidden, mask)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its first floating-point parameter or buffer."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def model_inputs(model: nn.Module, batch: Batch) -> Batch:
    """`batch` as `model` reads it: floating-point inputs (pixels) in the dtype it computes in (data is
    prepared in float32, a checkpoint may be bfloat16); token ids and masks as they are."""
    dtype = compute_dtype(model)
    return {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in batch.items()}


@dataclass
class Task:
    name: str  # "image-classification", "text-encoder", "causal-lm"
    modality: str  # "image" or "text"

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's output on `batch` (logits, or hidden states for an encoder), whatever the dtype
        the model computes in: every task's inputs are cast here, and only here."""
        return self.run(model, model_inputs(model, batch))

    def run(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: Batch, temperature: float) -> torch.Tensor:
        raise NotImplementedError

    def label_loss(self, student: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        return None


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    p_teacher = F.softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t


class ImageClassification(Task):
    def __init__(self) -> None:
        super().__init__("image-classification", "image")

    def run(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = model(batch["pixel_values"])
        return getattr(out, "logits", out)  # (B, classes); HF classifiers wrap their logits

    def distill_loss(self, student, teacher, batch, temperature):
        return _kl(student, teacher, temperature)

    def label_loss(self, student, batch):
        return F.cross_entropy(student.float(), batch["labels"]) if "labels" in batch else None


class TextEncoder(Task):
    """Compared by sentence embedding, pooled as the checkpoint's sentence-transformers config says
    (mean over real tokens when it says nothing)."""

    def __init__(self, pooling: str | None = None) -> None:
        super().__init__("text-encoder", "text")
        self.pooling = pooling or "mean"

    def embed(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool(hidden, mask, self.pooling)

    def run(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, C)

    def distill_loss(self, student, teacher, batch, temperature):
        """Hidden-state MSE (scaled by the teacher's power, so it is unit-free) plus embedding cosine."""
        mask = batch["attention_mask"].unsqueeze(-1).float()
        power = (teacher.float().pow(2) * mask).sum() / mask.sum() / teacher.shape[-1]
        mse = ((student.float() - teacher.float()).pow(2) * mask).sum() / mask.sum() / teacher.shape[-1] / power
        cos = F.cosine_similarity(self.embed(student.float(), batch["attention_mask"]),
                                  self.embed(teacher.float(), batch["attention_mask"]), dim=-1)
        return mse + (1 - cos).mean()


class CausalLM(Task):
    def __init__(self) -> None:
        super().__init__("causal-lm", "text")

    def run(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)

    def distill_loss(self, student, teacher, batch, temperature):
        keep = batch["attention_mask"].bool()
        return _kl(student[keep], teacher[keep], temperature)

    def label_loss(self, student, batch):
        return next_token_nll(student, batch).mean()


def next_token_nll(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-token negative log-likelihood of the next token over real (non-pad) positions."""
    targets = batch["input_ids"][:, 1:]
    keep = batch["attention_mask"][:, 1:].bool()
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return nll[keep]


def task_for(kind: str, model: nn.Module, pooling: str | None = None) -> Task:
    if kind == "timm":
        return ImageClassification()
    cls_name = type(model).__name__
    if cls_name.endswith(("ForCausalLM", "LMHeadModel")):
        return CausalLM()
    if cls_name.endswith("ForImageClassification"):
        return ImageClassification()
    return TextEncoder(pooling)
