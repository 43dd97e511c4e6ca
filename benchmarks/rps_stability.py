"""Is RPS training stable across init scales? Plain ROAST gradients vs STABLE-RPS, plain SGD, digits ViT.

The experiment of the STABLE-RPS paper (Desai & Shrivastava, ICLR 2024), small enough for a CPU:
ROAST reads w = lambda * g * m[h]; the memory's init scale sigma and lambda ~ 1 / sigma are a free
choice that leaves the function unchanged, but under SGD the step on w grows as lambda^2, so a 100x
range of sigma is a 10^4 range of effective learning rate. STABLE-RPS divides each slot's gradient by
sum lambda^2 over the weights reading it, which makes the step on w independent of sigma (at c = 1 it
is exactly dense SGD). Here sigma is `memory_scale` (x0.1 .. x10, the memory's RMS relative to the
weights'), the map and the signs are the same for both columns (only the gradient differs), the
optimiser is SGD with momentum, no clipping. As in practice, the learning rate is tuned once, at
scale x1, for each method (a small grid), then the init scale changes and the lr stays. By default
only the shared memory trains (--train shared; the dense reference trains the same weights), so the
lr grid tunes the memory alone: with every parameter training (--train all), the dense head, norms
and position embedding want a much smaller step than the memory of a 10x-compressed model, and no
single SGD lr suits both.

Two settings (--settings), each printed as tables of final eval accuracy:
  pretrained: ref:digits-vit, its Linear + patch-embedding weights (head apart) shared at compression c
            and projected by least squares, then trained with SGD and cross-entropy (the default);
  scratch:  the same architecture randomly initialised, shared the same way, trained from scratch.

    python benchmarks/rps_stability.py [--compression 10] [--settings pretrained,scratch] [--pretrained-steps 150]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from compresscli import compress_
from compresscli.io.checkpoint import build_model, load_checkpoint
from compresscli.io.data import Batcher, load_examples, split
from compresscli.methods.rps import RPSConfig
from compresscli.io.references import DIGITS_VIT


def targets(module: nn.Module, name: str) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) and name != "head"


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    correct = sum(int((model(b["pixel_values"]).argmax(-1) == b["labels"]).sum()) for b in batches)
    return correct / sum(len(b["labels"]) for b in batches)


def train_sgd(model: nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, lr: float, seed: int) -> tuple[int | None, float]:
    """SGD (momentum 0.9), cosine-decayed lr, cross-entropy. Returns (step it diverged at or None, last loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    loss = torch.tensor(0.0)
    model.train()
    for step in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        batch = batches[order.pop()]
        loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
        if not torch.isfinite(loss):
            return step, float("nan")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return None, loss.item()


def run(base: nn.Module, scale: float, scaled: bool, args, train, evaluation, steps: int, lr: float) -> tuple[float, str]:
    """(accuracy, shown) for one training run; scale 0 trains the dense model."""
    model = copy.deepcopy(base)
    torch.manual_seed(args.seed)
    if scale > 0:
        compress_(model, RPSConfig(compression=args.compression, mapper=args.mapper, memory_scale=scale,
                                   scale_gradients=scaled, seed=args.seed), targets)
    if args.train == "shared":  # only the shared weights learn (the memory; the same weights when dense)
        chosen = {id(m.weight) if scale == 0 else id(m.memory) for n, m in model.named_modules() if targets(m, n)
                  or hasattr(m, "memory")}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
    diverged, _ = train_sgd(model, train, steps, lr, args.seed)
    if diverged is not None:
        return -1.0, f"diverged (step {diverged})"
    acc = accuracy(model, evaluation)
    return acc, f"{acc:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", type=float, default=10.0)
    parser.add_argument("--mapper", default="randomfold", choices=["randomfold", "roast"])
    parser.add_argument("--scales", default="0.1,0.3,1,3,10")
    parser.add_argument("--lrs", default="0.003,0.01,0.03,0.1,0.3,1,3", help="SGD lr grid, searched at scale x1 only")
    parser.add_argument("--settings", default="pretrained", help="pretrained and/or scratch")
    parser.add_argument("--train", default="shared", choices=["shared", "all"],
                        help="shared: only the memory (dense: the targeted weights) learns; all: every parameter")
    parser.add_argument("--pretrained-steps", type=int, default=150)
    parser.add_argument("--scratch-steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.scales.split(",")]
    lrs = [float(s) for s in args.lrs.split(",")]

    splits = split(load_examples("digits"))
    batcher = Batcher("image", image_cfg=DIGITS_VIT["pretrained_cfg"])
    train = batcher.batches(splits.train, 64)
    evaluation = batcher.batches(splits.eval, 256)
    torch.manual_seed(args.seed)
    settings = {"scratch": lambda: build_model("timm", DIGITS_VIT),  # the digits ViT's architecture, random init
                "pretrained": lambda: load_checkpoint("ref:digits-vit").model}
    budget = {"scratch": args.scratch_steps, "pretrained": args.pretrained_steps}

    started = time.time()
    tables = []
    for label in args.settings.split(","):
        base, steps = settings[label](), budget[label]
        grid = {}  # (mode, lr) -> result at scale x1
        for lr in lrs:
            grid[("dense", lr)] = run(base, 0, False, args, train, evaluation, steps, lr)
            grid[("roast", lr)] = run(base, 1.0, False, args, train, evaluation, steps, lr)
            grid[("stable", lr)] = run(base, 1.0, True, args, train, evaluation, steps, lr)
            print(f"done {label} lr {lr:g}: " + ", ".join(f"{m} {grid[(m, lr)][1]}" for m in ("dense", "roast", "stable")),
                  flush=True)
        best = {m: max(lrs, key=lambda lr: grid[(m, lr)][0]) for m in ("roast", "stable")}
        rows = []
        for scale in scales:
            roast = grid[("roast", best["roast"])] if scale == 1.0 else run(base, scale, False, args, train, evaluation,
                                                                              steps, best["roast"])
            stable = grid[("stable", best["stable"])] if scale == 1.0 else run(base, scale, True, args, train,
                                                                                 evaluation, steps, best["stable"])
            rows.append((scale, roast[1], stable[1]))
            print(f"done {label} x{scale:g}: ROAST {roast[1]}, STABLE-RPS {stable[1]}", flush=True)
        tables.append((label, steps, grid, best, rows))

    print(f"\nRPS training stability on digits (eval split, {len(splits.eval)} images): compression "
          f"{args.compression:g}, mapper {args.mapper}, SGD momentum 0.9, cosine lr, no clipping, seed {args.seed}, "
          f"trained: {'the shared memory only' if args.train == 'shared' else 'every parameter'}; "
          f"{time.time() - started:.0f} s in all\n")
    for label, steps, grid, best, rows in tables:
        start = "random init" if label == "scratch" else "least-squares projection of ref:digits-vit"
        print(f"### {label}: {start}, {steps} SGD steps\n")
        print("Learning rate, chosen once per method at memory init scale x1 (accuracy at x1):\n")
        print("| lr | dense model | ROAST gradients | STABLE-RPS |")
        print("|---|---|---|---|")
        for lr in lrs:
            print(f"| {lr:g} | {grid[('dense', lr)][1]} | {grid[('roast', lr)][1]} | {grid[('stable', lr)][1]} |")
        print(f"\nThen the memory init scale varies over {scales[0]:g}x..{scales[-1]:g}x at that lr "
              f"(ROAST lr {best['roast']:g}, STABLE-RPS lr {best['stable']:g}):\n")
        print("| memory init scale | ROAST gradients | STABLE-RPS (scaled gradients) |")
        print("|---|---|---|")
        for scale, roast, stable in rows:
            print(f"| x{scale:g} | {roast} | {stable} |")
        print()


if __name__ == "__main__":
    main()
