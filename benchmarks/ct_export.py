"""`compress export --format compressed-tensors` of quantized models against `--format dense` and compresscli itself.

For each model and quantization recipe (round to nearest: the export reuses the stored codes, so the solver does not
matter): compress, export both ways (wall time in this process), then load each directory in a fresh process,
the way its users would (compresscli.load(OUT); from_pretrained(DIR) of the config's architecture class with
compresscli unimportable), run one forward on the same token ids and record the load wall time, the process's peak RSS
after the forward (VmHWM: everything the load and the first forward held, libraries included; not ru_maxrss,
which Linux carries over from the parent across exec) and the
output's relative error against compresscli's.

    flock /tmp/timing.lock python benchmarks/ct_export.py --out benchmarks/results/ct_export.md
    flock /tmp/timing.lock python benchmarks/ct_export.py --models llama-1b --recipes "rtn int4 g128" \
        --out benchmarks/results/ct_export_llama1b.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from compresscli.engine.options import RunOptions
from compresscli.engine.recipe import parse_recipe
from compresscli.engine.whole_model import run_recipe
from compresscli.interop.export import export
from compresscli.io.checkpoint import load_checkpoint

RECIPES = {
    "rtn int8 per row": "{bits: 8, group_size: null, solver: rtn}",
    "rtn int4 g128": "{bits: 4, group_size: 128, solver: rtn}",
}
MODELS = {"minilm": "ref:minilm", "llama-1b": "/work/scratch/llama-1b"}  # float32 / bfloat16 at the trained scale

CHILD = """
import json, sys, time
job = json.loads(sys.argv[1])
if job["loader"] != "compresscli":
    sys.modules["compresscli"] = None  # as a user without compresscli
import torch
start = time.perf_counter()
if job["loader"] == "compresscli":
    import compresscli
    model = compresscli.load(job["dir"])
else:
    import transformers
    architecture = transformers.AutoConfig.from_pretrained(job["dir"]).architectures[0]
    model = getattr(transformers, architecture).from_pretrained(job["dir"])  # the class compresscli.load builds
load_s = time.perf_counter() - start
ids = torch.arange(16).remainder(90).add(5).unsqueeze(0)
with torch.no_grad():
    out = model.eval()(input_ids=ids)
    out = (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()
torch.save(out, job["result"])
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]  # this image's own peak
print(json.dumps({"load_s": load_s, "peak_mib": int(hwm.split()[1]) / 1024}))
"""


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def load_elsewhere(directory: Path, loader: str, result: Path) -> dict:
    job = {"dir": str(directory), "loader": loader, "result": str(result)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_for(model: str, source: str, root: Path, recipes: list[str]) -> list[list[str]]:
    rows = []
    for name in recipes:
        params = RECIPES[name]
        recipe = parse_recipe(f"stages:\n  - method: quantize\n    targets: [mlp]\n    params: {params}\n", "<bench>")
        out = root / f"{model}-{name.replace(' ', '-')}"
        run_recipe(load_checkpoint(source), recipe, out, RunOptions(evaluate=False))
        dirs, export_s = {"compresscli OUT": (out, "compresscli")}, {}
        for fmt in ("compressed-tensors", "dense"):
            start = time.perf_counter()
            result = export(out, root / f"{out.name}-{fmt}", fmt)
            export_s[fmt] = time.perf_counter() - start
            dirs[f"export {fmt}"] = (result.to, "transformers")
        reference = None
        for label, (directory, loader) in dirs.items():
            measured = load_elsewhere(directory, loader, root / "out.pt")
            got = torch.load(root / "out.pt")
            reference = got if reference is None else reference
            rel = float((got - reference).norm() / reference.norm())
            fmt = label.removeprefix("export ")
            rows.append([model, name, label, f"{weight_bytes(directory) / 2**20:.1f}",
                         f"{export_s[fmt]:.1f}" if fmt in export_s else "", f"{measured['load_s']:.2f}",
                         f"{measured['peak_mib']:.0f}", f"{rel:.1e}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm"], choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    header = ["model", "recipe", "directory", "weights MiB", "export s", "load s", "peak RSS MiB", "rel err vs OUT"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            rows += rows_for(model, MODELS[model], Path(tmp), args.recipes)
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(row) + " |" for row in rows])
    text = (f"# compressed-tensors export of quantized models\n\n`{' '.join(sys.argv)}` (torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads)\n\n{table}\n")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
