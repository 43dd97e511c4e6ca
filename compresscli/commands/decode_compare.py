"""`compress bench --decode` as a library call: a compressed causal LM against its original, token by token.

Each model is measured in a fresh process (`decode_here`, one after the other, so that a 7B original and its
compressed copy never share the memory, and each load peak is the model's own); the machine's read bandwidth
is measured here first. Every model's bytes limit is bandwidth / bytes one batch-1 step reads, and its share
of that limit says how close its kernels come to the memory. Everything returned is JSON-able.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from compresscli.commands.bench import device_name, load_average
from compresscli.commands.decode import decode_speed, prefill_time, read_bandwidth, tensor_bytes
from compresscli.core.errors import CompressError

log = logging.getLogger(__name__)

PYTORCH_DECODING = "dense"  # the path name of a layer whose weight PyTorch decodes on every call (kernels.dispatch)


def decode_here(spec: str, threads: int, batches: list[int], steps: int, prefill_tokens: int) -> dict[str, Any]:
    """Load `spec` in this process and measure it: load time and peak, resident bytes, decode speed per batch
    size, prefill time, kernel paths."""
    from compresscli.core.resources import current_rss, peak_rss
    from compresscli.io.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    start = time.perf_counter()
    ckpt = load_checkpoint(spec)
    for tensor in ckpt.model.state_dict(keep_vars=True).values():
        tensor.detach().sum()  # noqa: B018 - weights a loader memory-maps count once read
    loaded = {"load_s": time.perf_counter() - start, "load_peak_rss": peak_rss(), "rss": current_rss(),
              "tensor_bytes": tensor_bytes(ckpt.model), "file_bytes": ckpt.file_bytes}
    model = ckpt.model.eval()
    if not (hasattr(model, "config") and callable(getattr(model, "generate", None))):
        raise CompressError(f"{spec} is not a causal language model", "compress bench --decode times text generation")
    return {"spec": spec, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), **loaded,
            "decode": [decode_speed(model, batch, steps) for batch in batches],
            "prefill": prefill_time(model, prefill_tokens)}


def _in_fresh_process(spec: str, options: dict[str, Any], timeout: float) -> dict[str, Any]:
    code = ("import json, sys; from compresscli.commands.decode_compare import decode_here; "
            "print('DECODE ' + json.dumps(decode_here(sys.argv[1], **json.loads(sys.argv[2]))))")
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, spec, json.dumps(options)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    line = [x for x in done.stdout.splitlines() if x.startswith("DECODE ")]
    if done.returncode != 0 or not line:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise CompressError(f"measuring {spec} failed: {reason}", "run it alone with -v to see the whole error")
    return json.loads(line[-1][len("DECODE "):])


def compare_decode(compressed: str, original: str, *, threads: int | None = None, batches: tuple[int, ...] = (1, 8),
                   steps: int = 16, prefill_tokens: int = 512, timeout: float = 3600) -> dict[str, Any]:
    """Both models' decode speed, prefill time and bytes, each against its bytes limit and the original."""
    threads = threads or torch.get_num_threads()
    bandwidth = read_bandwidth(threads)
    options = {"threads": threads, "batches": list(batches), "steps": steps, "prefill_tokens": prefill_tokens}
    load_before = load_average()
    models = {name: _in_fresh_process(spec, options, timeout) for name, spec in (("original", original),
                                                                                  ("compressed", compressed))}
    for measured in models.values():
        one = next((d for d in measured["decode"] if d["batch"] == 1), measured["decode"][0])
        measured["bytes_limit_tokens_per_s"] = bandwidth / one["bytes_read_per_step"] * one["batch"]
        measured["share_of_limit"] = one["tokens_per_s"] / measured["bytes_limit_tokens_per_s"]
        measured["pytorch_decoded_layers"] = sorted({name for d in measured["decode"]
                                                     for name, path in d["layer_paths"].items()
                                                     if path == PYTORCH_DECODING})
    base = models["original"]
    speedups = {f"decode_batch_{d['batch']}": d["tokens_per_s"] / b["tokens_per_s"]
                for d, b in zip(models["compressed"]["decode"], base["decode"])}
    speedups["prefill"] = base["prefill"]["ms"] / models["compressed"]["prefill"]["ms"]
    return {"original": original, "compressed": compressed, "threads": threads, "device_name": device_name(torch.device("cpu")),
            "torch": torch.__version__, "read_bandwidth_bytes_per_s": bandwidth, "steps": steps,
            "prompt_tokens": 16, "load_average": {"before": load_before, "after": load_average()},
            "models": models, "speedup": speedups}


def render_decode_markdown(result: dict[str, Any]) -> str:
    """The comparison as a markdown table, with the kernels each model's layers ran."""
    gb = result["read_bandwidth_bytes_per_s"] / 1e9
    lines = [f"{result['compressed']} against {result['original']}", "",
             f"Greedy decoding with the KV cache after a {result['prompt_tokens']}-token prompt, median of "
             f"{result['steps']} steps; {result['device_name']}, {result['threads']} threads; measured read "
             f"bandwidth {gb:.1f} GB/s", "",
             "| model | dtype | resident GB | GB read per token | " +
             " | ".join(f"batch {d['batch']} tokens/s" for d in result["models"]["original"]["decode"]) +
             " | bytes limit tokens/s | share of limit | prefill ms | load peak RSS GB |",
             "|---|---|---|---|" + "---|" * len(result["models"]["original"]["decode"]) + "---|---|---|---|"]
    for name, m in result["models"].items():
        speeds = " | ".join(f"{d['tokens_per_s']:.2f}" for d in m["decode"])
        lines.append(f"| {name} | {m['dtype']} | {m['tensor_bytes'] / 1e9:.3f} | "
                     f"{m['decode'][0]['bytes_read_per_step'] / 1e9:.3f} | {speeds} | "
                     f"{m['bytes_limit_tokens_per_s']:.2f} | {m['share_of_limit']:.0%} | "
                     f"{m['prefill']['ms']:.0f} | {m['load_peak_rss'] / 1e9:.2f} |")
    lines += ["", "Compressed vs original: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}x"
                                                         for k, v in result["speedup"].items()), ""]
    for name, m in result["models"].items():
        phases = [f"batch {d['batch']}: " + _paths(d["paths"]) for d in m["decode"]]
        lines.append(f"Kernels ({name}): " + "; ".join(phases + [f"prefill: {_paths(m['prefill']['paths'])}"]))
        if m["pytorch_decoded_layers"]:
            lines.append(f"WARNING: {len(m['pytorch_decoded_layers'])} layers of {name} decode their weight in "
                         f"PyTorch on every call: {', '.join(m['pytorch_decoded_layers'][:8])}")
    return "\n".join(lines)


def _paths(counts: dict[str, int]) -> str:
    return ", ".join(f"{path} x{n}" for path, n in sorted(counts.items())) or "no compressed layer"
