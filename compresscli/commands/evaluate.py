"""`compress eval` as a library call: a checkpoint beside its original on the same held-out data
(model.metrics computes the paired figures)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from compresscli.core.errors import CompressError
from compresscli.core.progress import Progress, SilentProgress
from compresscli.io.checkpoint import load_checkpoint, recorded_original
from compresscli.io.data import prepare_data
from compresscli.model.metrics import compare
from compresscli.training.distributed import pick_device


def evaluate_pair(checkpoint: str | Path, baseline: str | Path | None = None, *, weights: Path | None = None,
                  baseline_weights: Path | None = None, data: str | None = None, examples: int | None = None,
                  device: str = "auto", batch_size: int = 32, max_length: int = 128,
                  progress: Progress | None = None) -> dict[str, Any]:
    """`compress eval`: `checkpoint` beside its original on the same held-out data. The original is
    `baseline`, else the one a compresscli output records; a plain checkpoint with neither is scored
    alone, except an encoder, which is judged only by its embeddings' cosine to an original."""
    progress = progress or SilentProgress()
    dev = pick_device(device)
    with progress.task("loading checkpoints"):
        ckpt = load_checkpoint(checkpoint, weights)
        if baseline is not None:
            original = load_checkpoint(baseline, baseline_weights)
        elif ckpt.compression is not None:
            original = recorded_original(ckpt)
        else:
            original = None
    task = ckpt.task()
    if task.name == "text-encoder" and original is None:
        raise CompressError("an encoder is judged by embedding cosine to its original", "pass --baseline ORIGINAL")
    batcher, splits, spec = prepare_data(ckpt, task, data, max_length)
    batches = batcher.batches(splits.eval, batch_size, examples)
    with progress.task("evaluating"):
        metrics = compare(original.model.to(dev) if original else None, ckpt.model.to(dev), task, batches, dev)
    return {"data": spec, "checkpoint": ckpt.name, "baseline": original.name if original else None, **metrics}
