"""Running under torchrun: the process group, who this rank is, and the few collectives the engine
and the training loop need. Nothing here starts processes; torch.distributed.run (torchrun) does.

A run is distributed when torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) are set.
`process_group(device)` then initialises torch.distributed with NCCL for a CUDA device (cuda:LOCAL_RANK)
and gloo on the CPU, plus a small gloo group (`control`) for flags, timings and the final verdict, so
those CPU-side messages never go through NCCL and its short watchdog timeout. Every rank holds the
whole model and the same data; the training loop splits each global batch into disjoint per-rank
shards (`shard`) and averages the gradients (`reduce_gradients`); one-shot stages run on every rank
and `sync_modules` then makes their results identical (broadcast from rank 0), counting what differed.

Only rank 0 writes: `writer_outcome` wraps its writing and tells the other ranks (waiting in
`wait_for_writer`) whether OUT was published, so a failure anywhere ends every rank non-zero. A rank
that dies makes the others' next collective fail (gloo) or gets them stopped by torchrun's agent
(SIGTERM, turned into SystemExit here so temporary directories are removed on the way out).
"""
from __future__ import annotations

import logging
import os
import signal
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass, replace
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from compresscli.core.errors import CompressError

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Non-main ranks wait this long for rank 0 to write, verify and evaluate OUT (the control group's timeout).
OUTCOME_TIMEOUT = timedelta(hours=6)
_control: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process with no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.size, "backend": self.backend}


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


def from_env() -> World:
    """This process's place as torchrun's variables give it, before any process group exists."""
    if not launched():
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def world() -> World:
    """The initialised process group's view, or a single process when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def local_device(device: torch.device) -> torch.device:
    """Under torchrun every rank has its own GPU: a CUDA device becomes cuda:LOCAL_RANK."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", from_env().local_rank)
    return device


def pick_device(name: str) -> torch.device:
    """The device asked for; under torchrun a CUDA device is this rank's own (cuda:LOCAL_RANK)."""
    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"--device {name} asked for, but no CUDA device is available", "use --device cpu or auto")
    return local_device(torch.device(name))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Initialise the process group for `device` when torchrun launched this process and no group
    exists yet, and destroy it on the way out; otherwise use what is there (possibly nothing)."""
    global _control
    if not launched() or not dist.is_available():
        yield world()
        return
    if dist.is_initialized():  # the caller owns the group; add the control group once
        if _control is None:
            _control = dist.new_group(backend="gloo", timeout=OUTCOME_TIMEOUT)
        yield world()
        return
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), device_id=device if device.type == "cuda" else None)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _control = dist.new_group(backend="gloo", timeout=OUTCOME_TIMEOUT)
        log.info("rank %d of %d (%s) on %s", dist.get_rank(), dist.get_world_size(), dist.get_backend(), device)
        yield world()
    except RuntimeError as err:
        if not (isinstance(err, dist.DistError) or "closed by peer" in str(err)):
            raise
        said = str(err).split("] ")[-1].split(". ")[0]
        raise CompressError(f"rank {from_env().rank} stopped because another rank did ({said})",
                            "the first rank's error above says why; nothing was written") from err
    finally:
        _control = None
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


def _terminated(signum: int, frame: Any) -> None:
    """torchrun's agent stops the other workers with SIGTERM when one fails: leave through the normal
    exception path, so atomic_directory removes its temporary directory and the lock is released."""
    raise SystemExit(128 + signum)


def _group() -> dist.ProcessGroup | None:
    return _control


def barrier() -> None:
    """Every rank reaches this point (a rank that died makes it raise on the others)."""
    if world().distributed:
        dist.barrier(group=_group())


@contextmanager
def writer_outcome() -> Iterator[Callable[[], None]]:
    """Rank 0's side of publishing OUT. The body calls the function it is given once every rank must
    have finished its work (a barrier); from then on the other ranks wait in `wait_for_writer`, and
    leaving the body tells them whether OUT was published. A failure before that point tells nobody:
    the others may be inside a collective of the training loop, and learn of it when this rank exits."""
    armed = [False]

    def everyone_done() -> None:
        barrier()
        armed[0] = world().distributed

    try:
        yield everyone_done
    except BaseException:
        if armed[0]:
            _broadcast_flag(0)
        raise
    if armed[0]:
        _broadcast_flag(1)


def wait_for_writer() -> None:
    """The other ranks' side: finish together with rank 0 (the barrier it calls), then wait for its
    verdict and fail with it, so every rank exits alike."""
    if not world().distributed:
        return
    barrier()
    if not _broadcast_flag(0):
        raise CompressError("rank 0 failed while writing the output (its error says why); nothing was published")


def _broadcast_flag(value: int) -> bool:
    flag = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(flag, src=0, group=_group())
    return bool(flag.item())


def gather_floats(value: float) -> list[float]:
    """`value` from every rank, in rank order (a single process: [value])."""
    w = world()
    if not w.distributed:
        return [value]
    slots = torch.zeros(w.size, dtype=torch.float64)
    slots[w.rank] = value
    dist.all_reduce(slots, group=_group())
    return slots.tolist()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (a single process: as it is)."""
    if world().distributed:
        dist.all_reduce(tensor)
    return tensor


def same_on_every_rank(value: int) -> bool:
    """Whether every rank holds this integer (a checksum of what each computed on its own)."""
    if not world().distributed:
        return True
    check = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(check, op=dist.ReduceOp.MAX, group=_group())
    return check[0].item() == value and -check[1].item() == value


# ----------------------------------------------------------------------------- data parallelism

def examples_in(item: Any) -> int:
    """The batch size of an item: the leading dimension of its first tensor (0 if it holds none)."""
    for tensor in _tensors(item):
        return tensor.shape[0] if tensor.dim() else 1
    return 0


def shard(item: Any, rank: int, size: int) -> Any:
    """This rank's contiguous slice of a batch: every tensor whose leading dimension is the batch size
    is split into `size` near-equal parts (torch.tensor_split); other values (broadcast masks, scalars,
    config) are kept whole. Works through dicts, lists, tuples and dataclasses (calibration.BlockIO)."""
    if size == 1:
        return item
    n = examples_in(item)
    return _split(item, n, rank, size)


def _split(obj: Any, n: int, rank: int, size: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tensor_split(size)[rank] if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: _split(v, n, rank, size) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, n, rank, size) for v in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _split(getattr(obj, f.name), n, rank, size) for f in fields(obj) if f.init})
    return obj


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from _tensors(getattr(obj, f.name))


def reduce_gradients(params: list[nn.Parameter], scalars: list[float], device: torch.device) -> list[float]:
    """Sum, over the ranks, the (already weighted) gradients of `params` and `scalars` (weighted loss
    terms) in one all_reduce. A parameter gets a gradient when any rank gave it one (a rank with an
    empty shard gives none); one whose gradient is None everywhere keeps None, as in one process."""
    grads = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
             for p in params]
    extra = torch.tensor([float(p.grad is not None) for p in params] + scalars, device=device)
    flat = torch.cat(grads + [extra])
    dist.all_reduce(flat)
    has = flat[-len(extra):][:len(params)].tolist()
    sums = flat[-len(extra):][len(params):].tolist()
    offset = 0
    for p, present in zip(params, has):
        piece = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        if present:
            p.grad = piece.clone() if p.grad is None else p.grad.copy_(piece)
    return sums


@torch.no_grad()
def sync_modules(modules: dict[str, nn.Module], what: str) -> int:
    """Make the parameters and buffers of `modules` rank 0's on every rank; return how many tensors
    differed anywhere (0 when the stage is deterministic, as every one-shot stage is on the CPU; GPU
    kernels that add in a varying order can differ in the last bits). Ranks that disagree on the
    structure (names, shapes, dtypes) are a bug: that is an error, not something a broadcast can fix."""
    w = world()
    if not w.distributed:
        return 0
    tensors: dict[int, tuple[str, torch.Tensor]] = {}
    for prefix, module in modules.items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            tensors.setdefault(id(tensor), (f"{prefix}.{name}", tensor))  # a shared tensor (FiPS base) once
    layout = zlib.crc32(repr([(n, tuple(t.shape), str(t.dtype)) for n, t in tensors.values()]).encode())
    check = torch.tensor([layout, -layout], dtype=torch.int64)
    dist.all_reduce(check, op=dist.ReduceOp.MAX, group=_group())
    if check[0].item() != layout or -check[1].item() != layout:
        raise CompressError(f"the ranks built different structures in {what} (a bug: one-shot stages must be "
                            "deterministic)", "run it in one process, and report it with --debug output")
    differed = 0
    for _, tensor in tensors.values():
        if tensor.is_meta:
            continue
        buffer = tensor.detach().contiguous().clone()
        # as bytes: neither gloo nor NCCL takes every dtype a codec stores (int16 indices, bool masks, packed ints)
        dist.broadcast(buffer.reshape(-1).view(torch.uint8), src=0)
        if not w.is_main and not torch.equal(buffer, tensor):
            differed += 1
            tensor.copy_(buffer)
    return int(sum(gather_floats(float(differed))))


def relaunch_command(python: str, argv: list[str], nproc: int) -> list[str]:
    """The torchrun command that runs `argv` (this command line, --nproc removed) on `nproc` processes."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    # --standalone: a rendezvous on a free local port, so two runs on one machine do not collide
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "compresscli",
            *kept]
