"""benchmarks/results/decode.md from the raw JSON benchmarks/decode.py writes (layers.json, model-*.json).

Every ratio in a table was measured in one run: per layer, each form against F.linear on the dense weight in
the same process; per model, `compress bench --decode` (original and compressed back to back, one process
each, under one timing lock).
"""
from __future__ import annotations

import json
from pathlib import Path

TARGETS = {"magnitude-50": 1.2, "condensed-90": 1.6, "fips-40": 1.1, "int4-mlp": 1.6, "int4-all": 2.3}  # batch-1 tokens/s vs dense (issue 22)
PREFILL_TARGET = 0.9
SHARE_TARGET = 0.7


def _layer_tables(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no per-layer measurements)"]
    bandwidth = rows[0]["bandwidth"]
    out = [f"Read bandwidth measured in the run: {bandwidth / 1e9:.1f} GB/s (2 threads, a 1 GiB sum). The bytes "
           "limit of a product is the bytes it reads at batch 1 / that bandwidth; share = limit / measured time.",
           "Layers timed round robin over copies exceeding 1 GB (no cache reuse between calls), median of sweeps.",
           "",
           "Reading the table: a FiPS layer here holds its own U (in a model 12 matrices share one, so the model's "
           "bytes are far lower: see the model table); RPS reads one memory slot per weight from a memory 10x "
           "smaller that stays in cache, so its limit is the hash and the multiply, not the bytes (its `bytes "
           "limit` column is the dense layer's, for scale). `cpu` is the compiled kernel, `decoded` the weight "
           "decoded tile by tile for torch's GEMM; the choice is kernels/cpu_thresholds.py's (kernel vs decode + "
           "GEMM, not vs dense). A share above 100% means the layer read faster than the 1 GiB sum measured.",
           "",
           "| shape (out x in) | dtype | form | resident MB | batch 1 us (path) | vs dense | bytes limit us | "
           "share of limit | batch 8 us | vs dense | 512 rows ms (path) | vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {(tuple(r["shape"]), r["dtype"]): r for r in rows if r["form"] == "dense"}
    for r in sorted(rows, key=lambda r: (r["shape"], r["dtype"], r["form"] != "dense", r["form"])):
        base = dense.get((tuple(r["shape"]), r["dtype"]))
        one, eight, many = r["rows_1"], r["rows_8"], r["rows_512"]
        limit_us = one["bytes_read"] / r["bandwidth"] * 1e6

        def ratio(key: str) -> str:
            return f"{base[key]['us'] / r[key]['us']:.2f}x" if base else "n/a"

        out.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['form']} | {r['resident_bytes'] / 1e6:.1f} | "
                   f"{one['us']:.0f} ({one['path']}) | {ratio('rows_1')} | {limit_us:.0f} | {limit_us / one['us']:.0%} | "
                   f"{eight['us']:.0f} | {ratio('rows_8')} | {many['us'] / 1e3:.1f} ({many['path']}) | "
                   f"{ratio('rows_512')} |")
    return out


def _verdict(value: float, target: float) -> str:
    return f"{value:.2f}x ({'met' if value >= target else 'MISSED'}, target {target}x)"


def _model_tables(results: list[dict]) -> list[str]:
    if not results:
        return ["(no model measurements)"]
    out = []
    for tag in sorted({r["tag"] for r in results}):
        group = [r for r in results if r["tag"] == tag]
        first = group[0]
        out += [f"### {tag}: {first['original']}", "",
                f"{first['device_name']}, {first['threads']} threads, torch {first['torch']}; greedy decoding with the "
                f"KV cache after a {first['prompt_tokens']}-token prompt, median of {first['steps']} steps; prefill "
                f"of {first['models']['original']['prefill']['tokens']} tokens at batch 1.", "",
                "| model | resident GB | GB read / token | batch 1 tok/s | batch 8 tok/s | bytes limit tok/s | "
                "share of limit | prefill ms | load peak RSS GB | vs dense: batch 1 | batch 8 | prefill |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in group:
            for name in ("original", "compressed"):
                m = r["models"][name]
                speeds = {d["batch"]: d["tokens_per_s"] for d in m["decode"]}
                label = f"dense bf16 (run beside {r['form']})" if name == "original" else r["form"]
                ratios = (" | ".join([_verdict(r["speedup"].get("decode_batch_1", 0), TARGETS.get(r["form"], 1.0)),
                                      f"{r['speedup'].get('decode_batch_8', 0):.2f}x",
                                      _verdict(r["speedup"]["prefill"], PREFILL_TARGET)])
                          if name == "compressed" else " | | ")
                out.append(f"| {label} | {m['tensor_bytes'] / 1e9:.3f} | {m['decode'][0]['bytes_read_per_step'] / 1e9:.3f} | "
                           f"{speeds.get(1, 0):.2f} | {speeds.get(8, 0):.2f} | {m['bytes_limit_tokens_per_s']:.2f} | "
                           f"{m['share_of_limit']:.0%}{'' if m['share_of_limit'] >= SHARE_TARGET else ' (<70%)'} | "
                           f"{m['prefill']['ms']:.0f} | {m['load_peak_rss'] / 1e9:.2f} | {ratios} |")
        out += [""]
        for r in group:
            paths = r["models"]["compressed"]
            phases = [f"batch {d['batch']}: " + ", ".join(f"{p} x{n}" for p, n in sorted(d["paths"].items()))
                      for d in paths["decode"]]
            phases.append("prefill: " + ", ".join(f"{p} x{n}" for p, n in sorted(paths["prefill"]["paths"].items())))
            out.append(f"- {r['form']} ({r['recipe']}) kernels: " + "; ".join(phases) + f". Command: `flock /tmp/timing.lock python {r['command'].removeprefix('python ')}`")
        out.append("")
    return out


def write_report(raw: Path, report: Path) -> None:
    layers_path = raw / "layers.json"
    layers = json.loads(layers_path.read_text()) if layers_path.is_file() else []
    models = [json.loads(p.read_text()) for p in sorted(raw.glob("model-*.json"))]
    lines = ["# Decoding at the bytes limit (issue 22)", "",
             "Generated by `python benchmarks/decode.py report` from benchmarks/results/decode/*.json.", "",
             "## Per layer, at the Llama MLP shapes", "",
             "`flock /tmp/timing.lock python benchmarks/decode.py layers --dtypes float32,bfloat16`", "",
             *_layer_tables(layers), "",
             "## Per model: the generated Llamas against transformers' dense bf16", "",
             "`python benchmarks/decode.py model --source /work/scratch/llama-1b --tag 1b --sequential "
             "--work /work/scratch/decode/outs` (each compress run and each bench under the timing lock); the "
             "quantized rows with `--forms int8-mlp,int4-mlp` and, whole-model since the LM head lies outside "
             "the blocks, `--forms int4-all` without `--sequential`; the int8 sparse row (magnitude 50% then int8 "
             "values, issue 21's int8 row-sparse kernel) with `--forms magnitude-50-int8,magnitude-50`.", "",
             "The 7B-class model (Llama-2-7B's shapes at the trained weight scale: `python benchmarks/scale.py "
             "--models 7b --generate-only trained`) with `python benchmarks/decode.py model --source "
             "benchmarks/.generated/llama-7b-trained --tag 7b --work DIR --forms int4-all` (whole model) and "
             "`--sequential --forms magnitude-50` (block by block); the forms not listed under 7b were not "
             "measured there (time).", "",
             *_model_tables(models)]
    report.write_text("\n".join(lines) + "\n")
