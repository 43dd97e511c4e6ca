"""Fixed fan-in output heads that keep learning: what a condensed head costs to train, and what the mask
schedule and the penultimate auxiliary term do to accuracy.

cost      The largest output layer available offline: the generated Llama's lm_head (30522 x 2048, bfloat16,
          N(0, 1/fan_in) weights) trained alone on the penultimate representation of real text (pydoc through
          the generated model's body, computed once and cached) to reproduce the dense head's logits (KL):
          dense (the head itself trained) vs condensed fixed / rigl / set at the same sparsity. Each in its own
          process, for its peak RSS; steps per second include the update steps; the time of one update is given
          apart. Its weights are random, so this measures cost, and how close each schedule gets to the dense
          head's function; not accuracy on a task.
accuracy  The digits ViT with its classifier head condensed (10 classes x 64 inputs), the whole model recovered
          by finetune, with and without `aux: penultimate`; held-out accuracy.

    flock /tmp/timing.lock python benchmarks/condensed_head.py cost --sparsity 0.9 --steps 60
    flock /tmp/timing.lock python benchmarks/condensed_head.py accuracy --sparsities 0.9,0.95 --steps 300
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from compresscli import CondensedConfig, FinetuneConfig, StageContext, compress_
from compresscli.core.resources import peak_rss
from compresscli.io.checkpoint import load_checkpoint
from compresscli.io.data import prepare_data
from compresscli.methods.condensed import condense
from compresscli.methods.condensed_dst import attach, dynamic_sparsity
from compresscli.methods.condensed_update import update_topology
from compresscli.model.metrics import compare
from compresscli.training.loop import TrainConfig, train

LLAMA = Path("/work/scratch/llama-1b")
CACHE = Path("/tmp/condensed_head_hidden.pt")


def llama_hidden(tokens: int, seq: int) -> torch.Tensor:
    """(tokens, 2048) final-norm hidden states of pydoc text through the generated Llama's body, cached."""
    if CACHE.exists():
        cached = torch.load(CACHE)
        if cached.shape[0] >= tokens:
            return cached[:tokens]
    ckpt = load_checkpoint(str(LLAMA))
    batcher, splits, _ = prepare_data(ckpt, ckpt.task(), "pydoc", max_length=seq)
    states = []
    with torch.no_grad():
        for batch in batcher.batches(splits.train, 4):
            out = ckpt.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            states.append(out.last_hidden_state[batch["attention_mask"].bool()])  # real tokens only
            if sum(s.shape[0] for s in states) >= tokens:
                break
    hidden = torch.cat(states)[:tokens].contiguous()
    torch.save(hidden, CACHE)
    return hidden


def head_weight() -> torch.Tensor:
    with safe_open(str(LLAMA / "model.safetensors"), "pt") as f:
        return f.get_tensor("lm_head.weight")  # (30522, 2048) bfloat16


def cost_one(mode: str, sparsity: float, steps: int, every: int, batch_tokens: int, lr: float) -> dict:
    hidden = llama_hidden(batch_tokens * 24 + 1024, 64)
    train_h, eval_h = hidden[:-1024], hidden[-1024:]
    weight = head_weight()
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    dense.weight.data.copy_(weight)
    if mode == "dense":
        head = dense
    else:
        config = CondensedConfig(sparsity=sparsity, update=mode, every=every)
        head = condense(dense, config, None, head=True)
        if config.dynamic(head=True) is not None:
            attach(head, config.dynamic(head=True))
    model = nn.ModuleDict({"lm_head": head})
    items = list(train_h.split(batch_tokens))

    def loss(modules, h):
        with torch.no_grad():
            target = F.linear(h.float(), weight.float())
        # the loop trains float32 masters of bfloat16 weights (training.loop.float32_master): float inputs
        return F.kl_div(F.log_softmax(modules[0]["lm_head"](h.float()).float(), -1), F.softmax(target, -1),
                        reduction="batchmean"), None

    params = list(head.parameters())
    hooks = dynamic_sparsity(model, params, steps, 0)
    started = time.perf_counter()
    stats = train(params, items, loss, TrainConfig(steps, lr), torch.device("cpu"), hooks=hooks, modules=[model])
    seconds = time.perf_counter() - started
    row = {"mode": mode, "sparsity": sparsity if mode != "dense" else 0.0, "steps": steps, "every": every,
           "batch_tokens": batch_tokens, "train_seconds": round(seconds, 1),
           "steps_per_second": stats["steps_per_second_per_rank"][0], "final_kl": round(stats["final_loss"], 4)}
    with torch.no_grad():
        student = head(eval_h).float()  # back in bfloat16 after training
        teacher = F.linear(eval_h.float(), weight.float())
        row["eval_kl"] = round(F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean").item(), 4)
        row["top1_agreement"] = round((student.argmax(-1) == teacher.argmax(-1)).float().mean().item(), 4)
    if hooks is not None:
        row["mask_changed"] = hooks.summary()["mask_changed"]
        grad = torch.randn(head.out_features, head.fan_in)
        started = time.perf_counter()
        update_topology(head.values, head.indices, head.rows, grad if mode == "rigl" else None, 0.3,
                        head.values.numel(), head.out_features, head.fan_in,
                        generator=torch.Generator().manual_seed(0) if mode == "set" else None)
        row["one_update_seconds"] = round(time.perf_counter() - started, 2)
    row["peak_rss"] = peak_rss()
    return row


def accuracy(sparsities: list[float], steps: int, lr: float | None, every: int) -> list[dict]:
    lr = lr or 2e-4  # condensed_accuracy.py's recovery of the whole digits ViT
    ckpt = load_checkpoint("ref:digits-vit")
    original, task = ckpt.model.eval(), ckpt.task()
    batcher, splits, _ = prepare_data(ckpt, task, "digits")
    ctx = StageContext(teacher=original, task=task, train=batcher.batches(splits.train, 16))
    eval_batches = batcher.batches(splits.eval, 64)
    rows = []
    for sparsity in sparsities:
        for mode in ("none", "rigl", "set"):
            for aux in ("none", "penultimate"):
                model = copy.deepcopy(original)
                compress_(model, CondensedConfig(sparsity=sparsity, update=mode, every=every), lambda m, n: n == "head")
                before = compare(original, model, task, eval_batches, torch.device("cpu"))["metrics"][0]["compressed"]
                torch.manual_seed(0)
                stats = compress_(model, FinetuneConfig(steps=steps, lr=lr, aux=aux), None, ctx)
                after = compare(original, model, task, eval_batches, torch.device("cpu"))["metrics"][0]
                rows.append({"sparsity": sparsity, "k": model.head.k, "mode": mode, "aux": aux, "steps": steps,
                             "no_recovery": round(before, 4), "original": round(after["original"], 4),
                             "recovered": round(after["compressed"], 4), "mask_changed": stats.get("mask_changed")})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("what", choices=["cost", "accuracy"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--sparsities", default="0.9,0.95")
    parser.add_argument("--modes", default="dense,none,rigl,set")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch-tokens", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (cost, the head alone), 2e-4 (accuracy)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # one mode, in this process
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "accuracy":
        rows = accuracy([float(s) for s in args.sparsities.split(",")], args.steps, args.lr, args.every)
        print("\n| sparsity | k | mask | aux | no recovery | recovered | original | mask changed |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['sparsity']} | {r['k']} | {r['mode']} | {r['aux']} | {r['no_recovery']:.4f} | "
                  f"{r['recovered']:.4f} | {r['original']:.4f} | {r['mask_changed'] or '-'} |")
        return
    if args.one:
        print("ROW " + json.dumps(cost_one(args.one, args.sparsity, args.steps, args.every, args.batch_tokens,
                                           args.lr or 1e-3)))
        return
    llama_hidden(args.batch_tokens * 24 + 1024, 64)  # computed once, before the timed processes
    rows = []
    for mode in args.modes.split(","):
        done = subprocess.run([sys.executable, __file__, "cost", "--one", mode, "--sparsity", str(args.sparsity),
                               "--steps", str(args.steps), "--every", str(args.every), "--batch-tokens",
                               str(args.batch_tokens), "--lr", str(args.lr or 1e-3), "--threads", str(args.threads)],
                              check=False, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        rows.append(json.loads(next(l for l in done.stdout.splitlines() if l.startswith("ROW "))[4:]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| head | sparsity | steps/s | vs dense | one update (s) | peak RSS | eval KL to dense | top-1 agreement | "
          "mask changed |\n|---|---|---|---|---|---|---|---|---|")
    dense = next((r for r in rows if r["mode"] == "dense"), None)
    for r in rows:
        ratio = f"{r['steps_per_second'] / dense['steps_per_second']:.2f}x" if dense else ""
        print(f"| {r['mode']} | {r['sparsity']} | {r['steps_per_second']:.2f} | {ratio} | {r.get('one_update_seconds', '-')} | "
              f"{r['peak_rss'] / 2**30:.2f} GiB | {r['eval_kl']:.4f} | {r['top1_agreement']:.4f} | {r.get('mask_changed', '-')} |")


if __name__ == "__main__":
    main()
