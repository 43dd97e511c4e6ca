"""FiPS against per-layer truncated SVD and global magnitude pruning at equal MLP parameter budgets.

On the real pretrained MiniLM (its 6 MLPs, 7.08M weights): mean cosine between the compressed and the
original sentence embeddings on the held-out pydoc eval split. On the digits ViT (`--data digits`):
test accuracy on the digits eval split. Every method keeps the same fraction of the MLP weights
(FiPS: U plus the non-zeros of the V_i; SVD: both factors; magnitude: the non-zeros). Each baseline
is measured without training and again after the same block-wise reconstruction FiPS gets (same
steps, lr, batch size, calibration data), so the comparison isolates the parametrisation.

    python benchmarks/fips_minilm.py [--data pydoc|digits] [--budgets 0.5,0.4,0.25] [--steps 150]
        [--methods fips,svd,svd+rec,magnitude,magnitude+rec] [--calibration-examples 128]
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

from compresscli import MagnitudeConfig, StageContext, compress_
from compresscli.model.architecture import detect
from compresscli.io.checkpoint import load_checkpoint
from compresscli.io.data import batcher_for, load_examples, split
from compresscli.codecs.base import replace_module
from compresscli.methods.fips import FipsConfig
from compresscli.methods.reconstruct import reconstruct
from compresscli.training.loop import TrainConfig
from compresscli.codecs import SparseLinear
from compresscli.model.tasks import masked_mean, task_for

SOURCES = {"pydoc": ("ref:minilm", "embedding cosine to original"), "digits": ("ref:digits-vit", "accuracy")}


class LowRankLinear(nn.Module):
    """Per-layer truncated SVD baseline: W ~ B @ A with B (out x k), A (k x in), bias kept."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        u, s, vh = torch.linalg.svd(linear.weight.detach().float(), full_matrices=False)
        root = s[:rank].sqrt()
        self.b = nn.Parameter(u[:, :rank] * root)  # (out, k)
        self.a = nn.Parameter(root[:, None] * vh[:rank])  # (k, in)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.a.t()) @ self.b.t()  # (..., in) -> (..., k) -> (..., out)
        return y if self.bias is None else y + self.bias


def svd_rank(out_features: int, in_features: int, budget: float) -> int:
    """The largest k with k (in + out) <= budget * in * out."""
    return math.floor(budget * in_features * out_features / (in_features + out_features))


def mlp_layers(model: nn.Module) -> list[str]:
    return detect(model).groups["mlp"]


def apply_svd(model: nn.Module, budget: float) -> tuple[int, list[nn.Parameter]]:
    kept, params = 0, []
    for name in mlp_layers(model):
        linear = model.get_submodule(name)
        rank = svd_rank(linear.out_features, linear.in_features, budget)
        layer = LowRankLinear(linear, rank)
        replace_module(model, name, layer)
        kept += layer.a.numel() + layer.b.numel()
        params += list(layer.parameters())
    return kept, params


def apply_magnitude(model: nn.Module, budget: float) -> tuple[int, list[nn.Parameter]]:
    names = set(mlp_layers(model))
    compress_(model, MagnitudeConfig(sparsity=1 - budget, scope="global"), lambda m, n: n in names)
    layers = [model.get_submodule(n) for n in names]
    assert all(isinstance(layer, SparseLinear) for layer in layers)
    return sum(int(layer.mask.sum()) for layer in layers), [p for layer in layers for p in layer.parameters()]


def apply_fips(model: nn.Module, budget: float, args, ctx: StageContext) -> int:
    names = set(mlp_layers(model))
    config = FipsConfig(budget=budget, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                        group_size=args.group_size, sparsity=args.sparsity, mask_update=args.mask_update,
                        update_every=args.update_every)
    stats = compress_(model, config, lambda m, n: n in names, ctx)
    return stats["kept"]


class Scorer:
    """The metric on the eval split; the original's embeddings are computed once, not once per row."""

    def __init__(self, teacher: nn.Module, task, batches: list[dict], device: torch.device):
        self.task, self.batches, self.device = task, batches, device
        self.reference = self._outputs(teacher)
        self.original = self(teacher)

    @torch.no_grad()
    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        model.eval()
        outs = []
        for batch in self.batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = self.task.outputs(model, batch).float()
            outs.append(masked_mean(out, batch["attention_mask"]) if "attention_mask" in batch else out)
        return outs

    def __call__(self, model: nn.Module) -> float:
        outs = self._outputs(model)
        if self.task.name == "image-classification":
            correct = [(o.argmax(-1).cpu() == b["labels"]).float() for o, b in zip(outs, self.batches)]
            return torch.cat(correct).mean().item()
        cos = [torch.nn.functional.cosine_similarity(o, r, dim=-1) for o, r in zip(outs, self.reference)]
        return torch.cat(cos).mean().item()


def run(method: str, budget: float, original, args, ctx: StageContext, scorer: Scorer) -> dict:
    model = copy.deepcopy(original.model).to(ctx.device)
    started = time.time()
    recon = TrainConfig(steps=args.steps, lr=args.lr)
    block_names = [b.name for b in detect(model).blocks]
    if method == "fips":
        kept = apply_fips(model, budget, args, ctx)
    elif method.startswith("svd"):
        kept, params = apply_svd(model, budget)
        if method.endswith("+rec"):
            reconstruct(model, block_names, params, ctx, recon, args.batch_size)
    elif method.startswith("magnitude"):
        kept, params = apply_magnitude(model, budget)
        if method.endswith("+rec"):
            reconstruct(model, block_names, params, ctx, recon, args.batch_size)
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.time() - started
    return {"method": method, "budget": budget, "kept": kept, "score": scorer(model), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="pydoc", choices=sorted(SOURCES))
    parser.add_argument("--budgets", default="0.5,0.4,0.25")
    parser.add_argument("--methods", default="fips,svd,svd+rec,magnitude,magnitude+rec")
    parser.add_argument("--steps", type=int, default=150, help="reconstruction steps (FiPS and the +rec baselines)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--mask-update", default="fixed", choices=["rigl", "gmp", "fixed"])
    parser.add_argument("--update-every", type=int, default=20)
    parser.add_argument("--calibration-examples", type=int, default=128)
    parser.add_argument("--eval-examples", type=int, default=None, help="default: the whole eval split")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source, metric = SOURCES[args.data]
    original = load_checkpoint(source)
    task = task_for(original.kind, original.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batcher = batcher_for(original, task)
    splits = split(load_examples(args.data))
    calibration = batcher.batches(splits.calibration, 16, args.calibration_examples)
    eval_batches = batcher.batches(splits.eval, 32, args.eval_examples)
    teacher = copy.deepcopy(original.model).eval().requires_grad_(False).to(device)
    ctx = StageContext(teacher=teacher, task=task, calibration=calibration, device=device)
    scorer = Scorer(teacher, task, eval_batches, device)
    total = sum(original.model.get_submodule(n).weight.numel() for n in mlp_layers(original.model))
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for method in args.methods.split(","):
            row = run(method, budget, original, args, ctx, scorer)
            rows.append(row)
            print(f"done {method} budget={budget}: {row['score']:.4f} ({row['seconds']:.0f}s, kept {row['kept']})",
                  flush=True)
    n_cal = sum(len(b["attention_mask"] if "attention_mask" in b else b["pixel_values"]) for b in calibration)
    print(f"\n{source}: MLP weights {total:,}; {metric} on {sum(len(next(iter(b.values()))) for b in eval_batches)} "
          f"eval examples; reconstruction {args.steps} steps, lr {args.lr:g}, batch {args.batch_size}, "
          f"{n_cal} calibration examples; device {device}, {torch.get_num_threads()} threads\n")
    print(f"| budget | method | kept MLP weights | kept ratio | {metric} | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']:.2f} | {r['method']} | {r['kept']:,} | {r['kept'] / total:.4f} | {r['score']:.4f} | "
              f"{r['seconds']:.0f} |")
    print(f"\noriginal {metric}: {scorer.original:.4f}")


if __name__ == "__main__":
    main()
