"""GPTQ int4 (group 128) on every Linear of a generated 1.26B Llama's blocks: compresscli beside llm-compressor.

Both tools get the same calibration token ids (the first N examples of compresscli's calibration split of
a pydoc-derived text, each exactly L tokens, no padding) and quantize the same layers (every Linear of the
decoder blocks; lm_head and the embeddings stay bfloat16). Each tool runs as its own whole process under
/usr/bin/time -v (wall seconds and maximum resident set size of the process); the output's bytes on disk
are its safetensors files. The accuracy proxy is scored on held-out token ids (compresscli's eval split of
the same text, disjoint from the calibration) for the dense model and both outputs, each loaded its own
way: ours with `compresscli.load`, llm-compressor's compressed-tensors `pack-quantized` directory with
`transformers.AutoModelForCausalLM.from_pretrained` (compressed-tensors installed, no compresscli). The
checkpoint's weights are random at the trained scale, so the loss itself is near log(vocab); what tells the
quantizers apart is how far each output moves from the dense model: KL(dense || output) per token and the
top-1 agreement with the dense model's next-token prediction.

Steps (each CPU-heavy one under the timing lock; llm-compressor runs in its own venv, /work/llmc-venv, whose pins
differ; `score` skips the models it has already scored):

    python benchmarks/quantization_scale.py prepare                 # text, token ids, recipe, driver
    flock /tmp/timing.lock python benchmarks/quantization_scale.py ours
    flock /tmp/timing.lock python benchmarks/quantization_scale.py ours --variant onepass-minmax \
        --set 0.sequential=false --set 0.clip=minmax                 # llm-compressor's settings, as a second row
    flock /tmp/timing.lock python benchmarks/quantization_scale.py llmc --llmc-python /work/llmc-venv/bin/python
    flock /tmp/timing.lock python benchmarks/quantization_scale.py score
    python benchmarks/quantization_scale.py table                   # the table; raw figures in
                                                                    # benchmarks/results/quantization_scale-CHECKPOINT.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COMPRESS = str(Path(sys.executable).parent / "compress")

RECIPE = """description: GPTQ int4, one scale per 128 inputs (the gptq-int4 recipe's params) on every Linear of the blocks.
stages:
  - method: quantize
    targets: [linear]   # every nn.Linear but the LM head (llm-compressor's targets "Linear", ignore lm_head)
    params: {bits: 4, group_size: 128, solver: gptq}
"""

# Runs in llm-compressor's venv: its public oneshot API on the token ids compresscli calibrates with.
LLMC_DRIVER = """import json, sys, time, torch
from transformers import AutoModelForCausalLM
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
src, out, tokens = sys.argv[1:4]
torch.set_num_threads(2)
ids = json.load(open(tokens))["calibration"]
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
started = time.time()
oneshot(model=model, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
        num_calibration_samples=len(ids), max_seq_length=max(map(len, ids)), shuffle_calibration_samples=False)
seconds = time.time() - started
model.save_pretrained(out, save_compressed=True)
print("RESULT " + json.dumps({"oneshot_s": seconds}))
"""


def long_paragraphs(tokenizer, min_tokens: int) -> list[str]:
    """pydoc's paragraphs (compresscli's own reading of the corpus) joined in order into texts of at least
    `min_tokens` tokens, so that every example truncates to exactly the same length (no padding)."""
    from compresscli.io.data import load_examples

    texts, current = [], []
    for para in load_examples("pydoc").texts:
        current.append(para)
        if len(tokenizer(" ".join(current))["input_ids"]) >= min_tokens:
            texts.append(" ".join(current))
            current = []
    return texts


def prepare(args) -> None:
    from transformers import AutoTokenizer

    from compresscli.io.data import Batcher, load_examples, split

    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(args.checkpoint))
    text = args.work / "pydoc-long.txt"
    text.write_text("\n\n".join(long_paragraphs(tokenizer, args.max_length)) + "\n", encoding="utf-8")
    splits = split(load_examples(f"text:{text}"))
    batcher = Batcher("text", tokenizer=tokenizer, max_length=args.max_length)
    ids = {}
    for name, part, n in (("calibration", splits.calibration, args.calibration), ("eval", splits.eval, args.eval)):
        if len(part) < n:
            raise SystemExit(f"the {name} split holds {len(part)} texts, fewer than {n}")
        batch = batcher.batches(part, n, n)[0]
        if not bool(batch["attention_mask"].all()):
            raise SystemExit(f"padding in the {name} tokens: the texts are shorter than {args.max_length} tokens")
        ids[name] = batch["input_ids"].tolist()
    (args.work / "tokens.json").write_text(json.dumps(ids))
    (args.work / "recipe.yaml").write_text(RECIPE)
    (args.work / "llmc_gptq_llama.py").write_text(LLMC_DRIVER)
    print(f"{len(ids['calibration'])} x {args.max_length} calibration tokens, {len(ids['eval'])} x "
          f"{args.max_length} eval tokens, in {args.work}")


def time_v(command: list[str], log: Path) -> dict:
    """Run under /usr/bin/time -v (its stderr, progress included, into `log`): wall seconds, maximum resident
    set size (bytes), stdout."""
    started = time.time()
    with log.open("w") as err:
        done = subprocess.run(["/usr/bin/time", "-v", *command], check=False, stdout=subprocess.PIPE, stderr=err,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    seconds = time.time() - started
    stderr = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{stderr[-4000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    return {"wall_s": seconds, "max_rss_bytes": rss_kib * 1024, "stdout": done.stdout}


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def ours(args) -> None:
    """`compress run` (block by block); `--set` overrides go to an output of their own, `ours-VARIANT`."""
    stem = f"ours-{args.variant}" if args.variant else "ours"
    out = args.work / stem
    n = len(json.loads((args.work / "tokens.json").read_text())["calibration"])
    sets = [arg for value in args.set for arg in ("--set", value)]
    run = time_v([COMPRESS, "run", str(args.checkpoint), "--recipe", str(args.work / "recipe.yaml"), *sets, "--data",
                  f"text:{args.work / 'pydoc-long.txt'}", "--calibration-examples", str(n), "--max-length",
                  str(args.max_length), "--sequential", "--no-eval", "--out", str(out), "--force", "--json"],
                 args.work / f"{stem}.log")
    report = json.loads(run.pop("stdout"))["report"]
    stages = sum(s.get("seconds", 0.0) for s in report.get("stages", []))
    name = " ".join(["compresscli", *([f"[{args.variant}]"] if args.variant and not sets else []), *sets])
    row = {"tool": name, "out": out.name, **run, "stage_s": stages, "report_peak_rss_bytes": report["execution"]["peak_rss_bytes"],
           "bytes": safetensors_bytes(out)}
    (args.work / f"{stem}.json").write_text(json.dumps(row, indent=1))
    print(row)


def _ours_runs(work: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(work.glob("ours*.json"), key=lambda f: (f.stem != "ours", f.name))]


def llmc(args) -> None:
    out = args.work / "llmc"
    run = time_v([args.llmc_python, str(args.work / "llmc_gptq_llama.py"), str(args.checkpoint), str(out),
                  str(args.work / "tokens.json")], args.work / "llmc.log")
    result = json.loads(run.pop("stdout").split("RESULT ")[-1])
    row = {"tool": "llm-compressor", **run, "stage_s": result["oneshot_s"], "bytes": safetensors_bytes(out)}
    (args.work / "llmc.json").write_text(json.dumps(row, indent=1))
    print(row)


@torch.inference_mode()
def _log_probs(model, ids: list[list[int]]) -> list[torch.Tensor]:
    """Next-token log-probabilities (float32) of every eval sequence, one at a time."""
    return [torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, :-1].float(), -1) for seq in ids]


def score(args) -> None:
    """Loss and perplexity on the held-out ids; KL(dense || model) and top-1 agreement with the dense model.
    Models already in score.json are not scored again (the dense log-probabilities are kept on disk, float32)."""
    import gc

    import transformers

    import compresscli

    torch.set_num_threads(2)
    ids = json.loads((args.work / "tokens.json").read_text())["eval"]
    targets = [torch.tensor(seq[1:]) for seq in ids]
    loaders = {
        "dense": lambda: transformers.AutoModelForCausalLM.from_pretrained(str(args.checkpoint), dtype=torch.bfloat16),
        **{run["tool"]: (lambda out=run["out"]: compresscli.load(args.work / out)) for run in _ours_runs(args.work)},
        "llm-compressor": lambda: transformers.AutoModelForCausalLM.from_pretrained(str(args.work / "llmc")),
    }
    scores, dense_file = args.work / "score.json", args.work / "dense-logp.pt"
    rows = json.loads(scores.read_text()) if scores.is_file() and dense_file.is_file() else {}
    dense = torch.load(dense_file) if "dense" in rows else None
    for name, load in loaders.items():
        if name in rows and "error" not in rows[name]:
            continue
        try:
            model = load().eval()
        except Exception as err:  # noqa: BLE001 -- reported in the table: which output could not be loaded here, and why
            rows[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        started = time.time()
        logp = _log_probs(model, ids)
        del model
        gc.collect()
        nll = torch.cat([-lp.gather(1, t[:, None])[:, 0] for lp, t in zip(logp, targets)]).mean().item()
        row = {"loss": nll, "perplexity": math.exp(nll), "score_s": time.time() - started}
        if dense is None:
            dense = logp
            torch.save(dense, dense_file)
        else:
            kl = torch.cat([(d.exp() * (d - q)).sum(-1) for d, q in zip(dense, logp)])
            agree = torch.cat([d.argmax(-1) == q.argmax(-1) for d, q in zip(dense, logp)]).float()
            row.update(kl=kl.mean().item(), top1_agreement=agree.mean().item())
        rows[name] = row
        print(name, row, flush=True)
        scores.write_text(json.dumps(rows, indent=1))


def _row(name: str, run: dict, score: dict, dense_bytes: int) -> str:
    gib = 1024**3
    timing = (f"{run['stage_s']:.1f} | {run['wall_s']:.1f} | {run['max_rss_bytes'] / gib:.2f}"
              if "wall_s" in run else "- | - | -")
    disk = f"{run['bytes'] / gib:.3f} ({run['bytes'] / dense_bytes:.3f})" if "bytes" in run else "-"
    if "loss" not in score:
        return f"| {name} | {timing} | {disk} | not scored: {score.get('error', 'no output')} | | | |"
    return (f"| {name} | {timing} | {disk} | {score['loss']:.4f} | {score['perplexity']:.1f} | "
            f"{score.get('kl', 0.0):.5f} | {score.get('top1_agreement', 1.0):.4f} |")


def table(args) -> None:
    ids = json.loads((args.work / "tokens.json").read_text())
    scores = json.loads((args.work / "score.json").read_text()) if (args.work / "score.json").is_file() else {}
    dense_bytes = safetensors_bytes(args.checkpoint)
    runs = {"dense": {"bytes": dense_bytes}}
    runs.update({run["tool"]: run for run in _ours_runs(args.work)})
    if (args.work / "llmc.json").is_file():
        runs["llm-compressor"] = json.loads((args.work / "llmc.json").read_text())
    lines = [(f"Calibration: {len(ids['calibration'])} x {len(ids['calibration'][0])} tokens (the same ids for both); "
             f"held out: {len(ids['eval'])} x {len(ids['eval'][0])} tokens."), "",
             ("| model | quantize s (stages / oneshot) | whole process wall s | whole process max RSS GiB | on disk GiB "
             "(/ dense) | held-out loss | perplexity | KL(dense ‖ it) per token | top-1 agreement with dense |"),
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(name, runs.get(name, {}), scores.get(name, {}), dense_bytes)
              for name in runs]
    print("\n".join(lines))
    (args.work / "table.md").write_text("\n".join(lines) + "\n")
    raw = {"checkpoint": str(args.checkpoint), "calibration": [len(ids["calibration"]), len(ids["calibration"][0])],
           "eval": [len(ids["eval"]), len(ids["eval"][0])], "runs": runs, "scores": scores}
    (RESULTS / f"quantization_scale-{args.checkpoint.name}.json").write_text(json.dumps(raw, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "ours", "llmc", "score", "table"])
    parser.add_argument("--checkpoint", type=Path, default=Path("/work/scratch/llama-1b"))
    parser.add_argument("--work", type=Path, default=Path("/work/scratch/quantization-scale"))
    parser.add_argument("--calibration", type=int, default=24, help="calibration sequences")
    parser.add_argument("--eval", type=int, default=16, help="held-out sequences")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence (every one exactly this long)")
    parser.add_argument("--set", action="append", default=[], help="ours: a `compress run --set` override")
    parser.add_argument("--variant", default="", help="ours: the output's name (ours-VARIANT) for --set runs")
    parser.add_argument("--llmc-python", default="/work/llmc-venv/bin/python")
    args = parser.parse_args()
    globals()[args.step](args)


if __name__ == "__main__":
    main()
