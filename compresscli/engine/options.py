"""What a run is asked to do (`compress run`'s options, checked where they are made), and what each stage
of it did (StageRecord, the report's `stages`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from compresscli.core.errors import CompressError
from compresscli.core.resources import available_memory
from compresscli.training.distributed import pick_device

DEFAULT_SHARD_BYTES = 2 * 1024**3
BLOCK_INPUTS = ("compressed", "original")


@dataclass
class RunOptions:
    data: str | None = None  # --data spec; text models default to the pydoc corpus
    batch_size: int = 16
    calibration_examples: int = 128
    eval_examples: int | None = None  # None: the whole eval split
    max_length: int = 128
    device: str = "auto"
    seed: int = 0
    dry_run: bool = False
    evaluate: bool = True
    dtype: torch.dtype | None = None  # None: the checkpoint's own
    sequential: bool | None = None  # None: block by block only when the whole model would not fit
    max_memory: int | None = None  # bytes of host memory the run may use; None: what the machine has free
    block_inputs: str = "compressed"  # sequential: blocks read the compressed blocks' output, or the original's
    shard_bytes: int = DEFAULT_SHARD_BYTES  # outputs larger than this are written as shards with an index
    shard: bool | None = None  # recovery sharded across the ranks (FSDP2); None: when a rank's would not fit

    def __post_init__(self) -> None:
        if self.block_inputs not in BLOCK_INPUTS:
            raise CompressError(f"--block-inputs {self.block_inputs!r} is not compressed or original",
                                "pick one of the two")
        for name in ("batch_size", "calibration_examples", "max_length", "shard_bytes"):
            if getattr(self, name) < 1:
                raise CompressError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}",
                                    f"pass --{name.replace('_', '-')} 1 or more")
        if self.max_memory is not None and self.max_memory < 1:
            raise CompressError(f"--max-memory must be positive, got {self.max_memory}", "write e.g. --max-memory 8GiB")

    @property
    def resolved_device(self) -> str:
        return str(pick_device(self.device))

    def memory_budget(self) -> int:
        return self.max_memory if self.max_memory is not None else available_memory()

    def activation_bytes(self) -> int:
        """Sequential mode: activations kept in memory up to a quarter of the budget, the rest spill to disk."""
        return max(64 * 1024**2, self.memory_budget() // 4)


def check_out(out: Path | None, options: RunOptions, force: bool, source_dir: Path | None = None) -> None:
    """An output directory the run may write: not there yet (or `force`), not the checkpoint being read."""
    if out is None or options.dry_run:
        return
    out = Path(out)
    if out.exists() and not force:
        raise CompressError(f"output {out} already exists", "choose another --out, or pass --force to replace it")
    if source_dir is not None and out.resolve() == Path(source_dir).resolve():
        raise CompressError(f"--out {out} is the checkpoint being compressed", "write the output somewhere else")


@dataclass
class StageRecord:
    """One stage of a run: what it matched and what it did to their size (summed over units when the run
    goes block by block)."""

    stage: int
    method: str
    modules: list[str]
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 2)}
