"""Accuracy vs compression: RPS against global magnitude pruning and a smaller model of the same size.

The central experiment of the STABLE-RPS paper (Desai & Shrivastava, ICLR 2024), on CPU scale. For
each compression factor c (dense bytes of the targeted weights / their bytes on disk):

  rps        the targeted weights read one memory of n / c slots (randomfold, STABLE-RPS), projected
             from the pretrained weights by least squares, then recovered;
  magnitude  global magnitude pruning of the same weights at the sparsity whose encoding (values +
             bitmask or CSR, whichever the codec picks, indices included) takes 1 / c of the dense bytes;
  small      the same architecture with a narrower width, whose targeted weights number n / c,
             trained from random init with the same budget (distillation from the original + labels).

Every arm gets the same recovery: `finetune.recover` (AdamW, warm-up + cosine, KL to the original +
cross-entropy), same steps, lr, data order and seed. Biases, norms, embeddings of the ViTs and the
head stay dense in every arm and are not counted (they are the same in all arms). Targets: every
Linear but the head (the `linear` group). On the real MiniLM, the targets are every Linear and the
three embedding tables, and the metric is the sentence-embedding cosine to the original on held-out
pydoc paragraphs, both arms recovered with the same (short) budget; magnitude on embedding tables is done here by masking (the magnitude method only
prunes Linear/Conv2d), with its bytes computed by the codec's own formulas and the pruned entries
held at zero during recovery (zero gradient under AdamW without decay).

    python benchmarks/rps_tradeoff.py [--factors 2,4,10,30,100] [--steps 300] [--minilm-steps 40] [--models digits-vit,mnist1d-vit,minilm]
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

from compresscli import compress_
from compresscli.model.architecture import detect
from compresscli.io.checkpoint import build_model, load_checkpoint
from compresscli.io.data import batcher_for, load_examples, split
from compresscli.model.metrics import compare
from compresscli.methods.finetune import FinetuneConfig, recover
from compresscli.methods import StageContext
from compresscli.methods.magnitude import MagnitudeConfig
from compresscli.methods.rps import RPSConfig
from compresscli.codecs import sparse_codec
from compresscli.model.tasks import task_for

CLASSIFIERS = {"digits-vit": ("ref:digits-vit", "digits"), "mnist1d-vit": ("ref:mnist1d-vit", "mnist1d")}


# ----------------------------------------------------------------------------- sizes

def weight_bytes_sparse(weights: list[torch.Tensor], keep: list[int]) -> int:
    """Bytes of the sparse encodings (the codec picks bitmask or CSR per tensor), indices included."""
    total = 0
    for w, nnz in zip(weights, keep):
        rows, cols = w.shape[0], w[0].numel()
        fmt = sparse_codec.choose_format(rows, cols, nnz, w.element_size())
        total += (sparse_codec.bitmask_bytes(rows * cols, nnz, w.element_size()) if fmt == "bitmask"
                  else sparse_codec.csr_bytes(rows, cols, nnz, w.element_size()))
    return total


def magnitude_sparsity(weights: list[torch.Tensor], factor: float) -> tuple[float | None, float]:
    """The global sparsity whose encoded bytes are dense / factor (None if no sparsity gets there)."""
    magnitudes = [w.detach().abs().reshape(-1).sort().values for w in weights]
    flat = torch.cat(magnitudes).sort().values
    dense = sum(w.numel() * w.element_size() for w in weights)

    def ratio(sparsity: float) -> float:
        keep_total = round((1 - sparsity) * flat.numel())
        if keep_total == 0:
            return math.inf
        threshold = flat[flat.numel() - keep_total]
        keep = [int(m.numel() - torch.searchsorted(m, threshold)) for m in magnitudes]  # |w| >= threshold
        return dense / weight_bytes_sparse(weights, keep)

    lo, hi = 0.0, 1.0 - 1.0 / flat.numel()
    if ratio(hi) < factor:
        return None, ratio(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) < factor else (lo, mid)
    return hi, ratio(hi)


def narrow_config(config: dict, target_weights: int, names_of) -> tuple[dict, int]:
    """The config with the embed width whose targeted weight count is closest to `target_weights`."""
    best = None
    for width in range(2, config["model_args"]["embed_dim"] + 1):
        heads = next(h for h in (4, 2, 1) if width % h == 0 and width // h >= 2) if width >= 2 else 1
        candidate = {**config, "model_args": {**config["model_args"], "embed_dim": width, "num_heads": heads}}
        count = names_of(build_model("timm", candidate))
        if best is None or abs(count - target_weights) < abs(best[1] - target_weights):
            best = (candidate, count)
    return best


def linear_weights(model: nn.Module) -> list[str]:
    return detect(model).groups["linear"]


def count_weights(model: nn.Module, names: list[str]) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in names)


# ----------------------------------------------------------------------------- arms

def recovered(model: nn.Module, ctx: StageContext, steps: int, lr: float) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    recover(model, list(model.parameters()), FinetuneConfig(steps=steps, lr=lr), ctx)
    return model.eval()


def metric(teacher: nn.Module, model: nn.Module, ctx: StageContext, batches) -> float:
    result = compare(teacher, model, ctx.task, batches, ctx.device)
    return result["metrics"][0]["compressed"]  # accuracy (classifiers) / embedding cosine (encoders)


def rps_arm(original: nn.Module, names: list[str], factor: float, seed: int) -> tuple[nn.Module, float]:
    model = copy.deepcopy(original)
    wanted = set(names)
    stats = compress_(model, RPSConfig(compression=factor, seed=seed), lambda m, n: n in wanted)
    memory_bytes = stats["memory"] * 4 + 4 * stats["layers"]  # the memory and one fp32 scale per tensor
    dense = sum(model.get_submodule(n).weight.numel() * 4 for n in names)
    return model, dense / memory_bytes


def magnitude_arm(original: nn.Module, names: list[str], factor: float, real_method: bool) -> tuple[nn.Module | None, float, float | None]:
    model = copy.deepcopy(original)
    layers = [model.get_submodule(n) for n in names]
    sparsity, achieved = magnitude_sparsity([l.weight for l in layers], factor)
    if sparsity is None:
        return None, achieved, None
    if real_method:  # the tool's own method and codec; the encoded bytes are checked against the estimate
        wanted = set(names)
        compress_(model, MagnitudeConfig(sparsity=sparsity, scope="global"), lambda m, n: n in wanted)
        on_disk = sum(v.numel() * v.element_size() for n in names
                      for k, v in model.get_submodule(n).to_tensors().items() if k != "bias")
        dense = sum(l.weight.numel() * 4 for l in layers)
        achieved = dense / on_disk
    else:  # masking (embedding tables included), same global threshold rule
        flat = torch.cat([l.weight.detach().abs().reshape(-1) for l in layers])
        keep = round((1 - sparsity) * flat.numel())
        threshold = flat.kthvalue(flat.numel() - keep + 1).values
        with torch.no_grad():
            for l in layers:
                l.weight.mul_(l.weight.abs() >= threshold)
    return model, achieved, sparsity


# ----------------------------------------------------------------------------- runs

def classifier_rows(name: str, args, device: torch.device) -> list[tuple]:
    source, data = CLASSIFIERS[name]
    ckpt = load_checkpoint(source)
    teacher = ckpt.model.eval().requires_grad_(False)
    task = task_for(ckpt.kind, teacher)
    batcher = batcher_for(ckpt, task)
    splits = split(load_examples(data))
    ctx = StageContext(teacher=teacher, task=task, train=batcher.batches(splits.train, args.batch_size),
                       device=device, seed=args.seed)
    evaluation = batcher.batches(splits.eval, 256)
    names = linear_weights(teacher)
    n = count_weights(teacher, names)
    base = metric(teacher, teacher, ctx, evaluation)
    rows = []
    for factor in args.factors:
        t0 = time.time()
        model, rps_ratio = rps_arm(teacher, names, factor, args.seed)
        rps_projected = metric(teacher, model, ctx, evaluation)
        rps_acc = metric(teacher, recovered(model, ctx, args.steps, args.lr), ctx, evaluation)

        model, mag_ratio, sparsity = magnitude_arm(teacher, names, factor, real_method=True)
        if model is None:
            mag_pruned = mag_acc = None
        else:
            mag_pruned = metric(teacher, model, ctx, evaluation)
            mag_acc = metric(teacher, recovered(model, ctx, args.steps, args.lr), ctx, evaluation)

        small_cfg, small_n = narrow_config(ckpt.config, round(n / factor), lambda m: count_weights(m, linear_weights(m)))
        torch.manual_seed(args.seed)
        small = build_model("timm", small_cfg)
        small_acc = metric(teacher, recovered(small, ctx, args.steps, args.lr), ctx, evaluation)
        rows.append((name, factor, base, rps_ratio, rps_projected, rps_acc, mag_ratio, sparsity, mag_pruned, mag_acc,
                     small_cfg["model_args"]["embed_dim"], n / small_n, small_acc, time.time() - t0))
        print(f"done {name} c={factor:g}: rps {rps_acc:.4f}, magnitude {mag_acc}, small {small_acc:.4f}", flush=True)
    return rows


def minilm_rows(args, device: torch.device) -> list[tuple]:
    ckpt = load_checkpoint("ref:minilm")
    teacher = ckpt.model.eval().requires_grad_(False)
    task = task_for(ckpt.kind, teacher)
    batcher = batcher_for(ckpt, task)
    splits = split(load_examples("pydoc"))
    ctx = StageContext(teacher=teacher, task=task, device=device, seed=args.seed,
                       train=batcher.batches(splits.train, 16))
    evaluation = batcher.batches(splits.eval, 32, args.minilm_eval)
    groups = detect(teacher).groups
    names = groups["linear"] + groups["embeddings"]
    rows = []
    for factor in args.factors:
        t0 = time.time()
        model, rps_ratio = rps_arm(teacher, names, factor, args.seed)
        rps_cos = metric(teacher, model, ctx, evaluation)
        rps_rec = metric(teacher, recovered(model, ctx, args.minilm_steps, args.minilm_lr), ctx, evaluation)
        del model
        model, mag_ratio, sparsity = magnitude_arm(teacher, names, factor, real_method=False)
        mag_cos = mag_rec = None
        if model is not None:
            mag_cos = metric(teacher, model, ctx, evaluation)
            for n in names:  # pruned entries get zero gradient, so AdamW (no decay) leaves them at exactly 0
                w = model.get_submodule(n).weight
                w.requires_grad_(True).register_hook(lambda g, keep=(w != 0): g * keep)
            mag_rec = metric(teacher, recovered(model, ctx, args.minilm_steps, args.minilm_lr), ctx, evaluation)
        del model
        rows.append((factor, rps_ratio, rps_cos, rps_rec, mag_ratio, sparsity, mag_cos, mag_rec, time.time() - t0))
        print(f"done minilm c={factor:g}: rps {rps_cos:.4f}, magnitude {mag_cos}", flush=True)
    return rows


def fmt(v, digits=4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", default="2,4,10,30,100")
    parser.add_argument("--models", default="digits-vit,mnist1d-vit,minilm")
    parser.add_argument("--steps", type=int, default=300, help="recovery / training steps of every classifier arm")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--minilm-steps", type=int, default=40, help="recovery steps of both MiniLM arms")
    parser.add_argument("--minilm-lr", type=float, default=2e-4)
    parser.add_argument("--minilm-eval", type=int, default=128, help="held-out pydoc paragraphs for the cosine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.factors = [float(f) for f in args.factors.split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    started = time.time()
    models = args.models.split(",")
    rows = [r for m in models if m in CLASSIFIERS for r in classifier_rows(m, args, device)]
    lm_rows = minilm_rows(args, device) if "minilm" in models else []

    print(f"\n{time.time() - started:.0f} s in all, device {device}")
    if rows:
        print(f"\nAccuracy vs compression (eval split); recovery budget {args.steps} steps (AdamW lr {args.lr:g}, "
              f"batch {args.batch_size}, distillation + labels) for every arm\n")
        print("| model | c | original | RPS: ratio | RPS projected | RPS recovered | magnitude: ratio | sparsity | "
              "pruned | magnitude recovered | small: width | ratio | small trained | seconds |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (name, c, base, rr, rp, ra, mr, s, mp, ma, width, sr, sa, sec) in rows:
            print(f"| {name} | {c:g} | {base:.4f} | {rr:.1f} | {rp:.4f} | **{ra:.4f}** | {mr:.1f} | {fmt(s)} | {fmt(mp)} | "
                  f"**{fmt(ma)}** | {width} | {sr:.1f} | **{sa:.4f}** | {sec:.0f} |")
    if lm_rows:
        print(f"\nMiniLM (every Linear + the 3 embedding tables): sentence-embedding cosine to the original on "
              f"{args.minilm_eval} held-out pydoc paragraphs; recovery {args.minilm_steps} steps for both arms "
              f"(AdamW lr {args.minilm_lr:g}, batch 16, distillation)\n")
        print("| c | RPS: ratio | RPS projected | RPS recovered | magnitude: ratio | sparsity | magnitude pruned | "
              "magnitude recovered | seconds |")
        print("|---|---|---|---|---|---|---|---|---|")
        for c, rr, rc, rrec, mr, s, mc, mrec, sec in lm_rows:
            print(f"| {c:g} | {rr:.1f} | {rc:.4f} | **{rrec:.4f}** | {mr:.1f} | {fmt(s)} | {fmt(mc)} | **{fmt(mrec)}** | {sec:.0f} |")


if __name__ == "__main__":
    main()
