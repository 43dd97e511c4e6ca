"""Calibration, fine-tune and evaluation data, as lists of batches fitted to a model.

Every source is split once, by a fixed permutation, into three disjoint parts: eval (20%),
calibration (10%) and train (70%). The split does not depend on the run's seed, so a model trained
on a source's train+calibration part (the digits reference) is never evaluated on what it saw.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compresscli.core.errors import DataError

SPLIT_SEED = 0
EVAL_FRACTION, CALIBRATION_FRACTION = 0.2, 0.1
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SOURCES = ("digits", "mnist1d", "text:FILE", "imagefolder:DIR", "pydoc")


@dataclass
class Examples:
    """Raw examples of one source: images in [0, 1] as (N, C, H, W) with labels, or texts."""

    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    texts: list[str] | None = None
    name: str = ""

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.images)

    def subset(self, index: list[int]) -> "Examples":
        if self.texts is not None:
            return Examples(texts=[self.texts[i] for i in index], name=self.name)
        idx = torch.tensor(index, dtype=torch.long)
        return Examples(self.images[idx], None if self.labels is None else self.labels[idx], name=self.name)


@dataclass
class Splits:
    eval: Examples
    calibration: Examples
    train: Examples


def load_examples(spec: str) -> Examples:
    """Parse a `--data` spec into examples."""
    if spec == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        return Examples(images, torch.tensor(digits.target), name="digits")
    if spec == "mnist1d":
        return _mnist1d()
    if spec == "pydoc":
        import pydoc_data.topics

        return Examples(texts=_paragraphs("\n\n".join(pydoc_data.topics.topics.values())), name="pydoc")
    if spec.startswith("text:"):
        path = Path(spec[5:])
        if not path.is_file():
            raise DataError(f"no such text file: {path}", "pass --data text:FILE with an existing UTF-8 file")
        texts = _paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        if len(texts) < 10:
            raise DataError(f"{path} holds only {len(texts)} usable paragraphs", "give a text with at least 10 paragraphs")
        return Examples(texts=texts, name=path.name)
    if spec.startswith("imagefolder:"):
        return _image_folder(Path(spec[12:]))
    from compresscli.core.registry import did_you_mean

    raise DataError(f"unknown data source {spec!r}", did_you_mean(spec, list(SOURCES)))


def split(examples: Examples) -> Splits:
    order = list(range(len(examples)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_eval = max(1, int(len(order) * EVAL_FRACTION))
    n_cal = max(1, int(len(order) * CALIBRATION_FRACTION))
    return Splits(examples.subset(order[:n_eval]), examples.subset(order[n_eval:n_eval + n_cal]),
                  examples.subset(order[n_eval + n_cal:]))


def _paragraphs(text: str) -> list[str]:
    """Paragraphs of real prose, whitespace folded; very short lines (headings, code) are dropped, and
    repeats too, so that no paragraph can land in two splits."""
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return list(dict.fromkeys(p for p in paras if len(p) >= 40))


def _mnist1d() -> Examples:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())  # generated locally from the fixed default seed
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]])
    x = (x - x.mean()) / x.std() * 0.25 + 0.5  # map the signal to roughly [0, 1] like an image
    return Examples(torch.from_numpy(x).view(len(x), 1, 1, -1), torch.from_numpy(y).long(), name="mnist1d")


def _image_folder(root: Path) -> Examples:
    from PIL import Image

    if not root.is_dir():
        raise DataError(f"no such image folder: {root}", "pass --data imagefolder:DIR with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, label) for label, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{root} has no images in class sub-folders", "lay it out as DIR/CLASS/IMAGE.png")
    images = []
    for f, _ in files:
        with Image.open(f) as img:
            arr = np.asarray(img.convert("RGB").resize((224, 224)), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(arr).permute(2, 0, 1))
    return Examples(torch.stack(images), torch.tensor([label for _, label in files]), name=root.name)


# ----------------------------------------------------------------------------- fitting to a model

def fit_images(images: torch.Tensor, input_size: tuple[int, int, int], mean, std) -> torch.Tensor:
    """Match the model's channels and resolution, then normalise as the model was trained."""
    c, h, w = input_size
    if images.shape[1] != c:  # grey <-> colour through the grey level
        images = images.mean(1, keepdim=True).expand(-1, c, -1, -1)
    if tuple(images.shape[-2:]) != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


class Batcher:
    """Turns examples into model-ready batches (CPU tensors), given how the model reads input."""

    def __init__(self, modality: str, image_cfg: dict[str, Any] | None = None, tokenizer=None, max_length: int = 128):
        self.modality = modality
        self.image_cfg = image_cfg or {}
        self.tokenizer = tokenizer
        self.max_length = max_length

    def batches(self, examples: Examples, batch_size: int, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
        n = len(examples) if limit is None else min(limit, len(examples))
        return [self._batch(examples.subset(list(range(i, min(i + batch_size, n))))) for i in range(0, n, batch_size)]

    def _batch(self, ex: Examples) -> dict[str, torch.Tensor]:
        if self.modality == "image":
            if ex.images is None:
                raise DataError(f"data source {ex.name!r} holds text but the model reads images",
                                "pass --data digits, mnist1d or imagefolder:DIR")
            cfg = self.image_cfg
            batch = {"pixel_values": fit_images(ex.images, tuple(cfg["input_size"]), cfg["mean"], cfg["std"])}
            if ex.labels is not None:
                batch["labels"] = ex.labels
            return batch
        if ex.texts is None:
            raise DataError(f"data source {ex.name!r} holds images but the model reads text",
                            "pass --data pydoc or --data text:FILE")
        enc = self.tokenizer(ex.texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def batcher_for(checkpoint, task, max_length: int = 128) -> Batcher:
    """How this checkpoint reads input: timm's pretrained_cfg for images, its tokenizer for text."""
    if task.modality == "image":
        cfg = checkpoint.config.get("pretrained_cfg") or getattr(checkpoint.model, "pretrained_cfg", {})
        missing = [k for k in ("input_size", "mean", "std") if k not in cfg]
        if missing:
            raise DataError(f"{checkpoint.name} does not say how it reads images (no {missing} in its config)",
                            "add them to pretrained_cfg in config.json")
        return Batcher("image", image_cfg=cfg)
    from transformers import AutoTokenizer

    directory = checkpoint.directory
    if directory is None or not any((directory / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model")):
        raise DataError(f"{checkpoint.name} has no tokenizer files beside its config",
                        "copy tokenizer.json / vocab.txt into the checkpoint directory")
    return Batcher("text", tokenizer=AutoTokenizer.from_pretrained(str(directory)), max_length=max_length)


def prepare_data(checkpoint, task, spec: str | None, max_length: int = 128) -> tuple[Batcher, Splits, str]:
    """The batcher, splits and data name for `checkpoint`: `spec`, or the pydoc corpus for a text model
    (images have no default: the classes must be the model's)."""
    spec = spec or ("pydoc" if task.modality == "text" else None)
    if spec is None:
        raise DataError(f"{checkpoint.name} reads images and no --data was given",
                        "pass --data digits, mnist1d or imagefolder:DIR")
    return batcher_for(checkpoint, task, max_length), split(load_examples(spec)), spec
