"""The `compress` command: argument parsing, progress display and error presentation only."""
from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from compresscli.core.errors import CompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress pretrained checkpoints (timm, Hugging Face) into truly small safetensors.")
out_console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

CheckpointArg = Annotated[str, typer.Argument(help="HF/timm/compressed directory, `timm:ARCH` (with --weights) or `ref:NAME`.")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Weights for a `timm:ARCH` checkpoint.")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="digits | mnist1d | pydoc | text:FILE | imagefolder:DIR.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda[:N].")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size for calibration, fine-tuning and eval.")]


class RichProgress:
    """The library's progress interface drawn with rich, on stderr so --json stdout stays clean."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: Progress | None = None  # the live display; a task started inside another adds a row to it

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        if not self.enabled:
            yield _NoTask()
            return
        if self._bar is not None:
            task_id = self._bar.add_task(description, total=total, info="")
            try:
                yield _RichTask(self._bar, task_id)
            finally:
                self._bar.remove_task(task_id)
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
        started = time.monotonic()
        # Transient, so a failed step leaves only the one-line error behind; success leaves a summary.
        with Progress(*columns, console=err_console, transient=True) as bar:
            self._bar = bar
            try:
                task = _RichTask(bar, bar.add_task(description, total=total, info=""))
                yield task
            finally:
                self._bar = None
        err_console.print(f"[green]done[/] {description} {task.info} ({time.monotonic() - started:.1f} s)",
                          highlight=False)


class _RichTask:
    def __init__(self, bar: Progress, task_id: int):
        self.bar, self.task_id = bar, task_id

        self.info = ""

    def advance(self, n: int = 1, **info: float) -> None:
        self.info = " ".join(f"{k} {v:.4g}" for k, v in info.items())
        self.bar.update(self.task_id, advance=n, info=self.info)


class _NoTask:
    def advance(self, n: int = 1, **info: float) -> None:
        pass


@app.callback()
def main_options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
                 verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the library does.")] = False) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose or debug else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


@app.command()
def run(checkpoint: CheckpointArg,
        recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe file, or a bundled recipe name.")],
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (written atomically).")] = None,
        weights: WeightsOpt = None, data: DataOpt = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value: STAGE.KEY=VALUE.")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what each stage matches, the sizes and the predicted memory; write nothing.")] = False,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
        device: DeviceOpt = "auto", batch_size: BatchOpt = 16,
        eval_examples: Annotated[Optional[int], typer.Option("--eval-examples", min=1, help="Cap on held-out examples.")] = None,
        calibration_examples: Annotated[int, typer.Option("--calibration-examples", min=1, help="Calibration examples (one-shot solvers, reconstruction).")] = 128,
        max_length: Annotated[int, typer.Option("--max-length", min=2, help="Tokens per text example.")] = 128,
        no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the original-vs-compressed evaluation.")] = False,
        sequential: Annotated[Optional[bool], typer.Option("--sequential/--whole-model", help="Compress block by block (the model is never in memory whole), or hold it whole. Default: whole when the prediction fits --max-memory.", show_default=False)] = None,
        max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Host memory the run may use, e.g. 8GiB (default: what is free).")] = None,
        dtype: Annotated[str, typer.Option("--dtype", help="auto (the checkpoint's own), float32, bfloat16 or float16.")] = "auto",
        block_inputs: Annotated[str, typer.Option("--block-inputs", help="Sequential: feed each block the compressed blocks' output (compressed) or the original's (original).")] = "compressed",
        shard_size: Annotated[str, typer.Option("--shard-size", help="Largest output file before sharding, e.g. 2GiB.")] = "2GiB",
        seed: Annotated[int, typer.Option("--seed")] = 0, as_json: JsonOpt = False,
        nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Recover data-parallel on N processes on this machine: runs this command under torchrun (--nproc-per-node N); one GPU each when there are GPUs.")] = None,
        shard: Annotated[Optional[bool], typer.Option("--shard/--no-shard", help="Under torchrun: shard the recovery's parameters, gradients and optimiser state across the processes (FSDP2). Default: when one process's would not fit its memory.", show_default=False)] = None) -> None:
    """Compress CHECKPOINT with a recipe, recover, export to OUT, verify the reload and report."""
    from compresscli.training import distributed
    from compresscli.io.checkpoint import parse_dtype
    from compresscli.engine.options import RunOptions
    from compresscli.engine.run import compress_source
    from compresscli.engine.recipe import load_recipe
    from compresscli.io.safetensors import parse_size
    from compresscli.io.source import open_source

    if nproc is not None:
        if distributed.launched():
            raise CompressError("--nproc given to a command torchrun already started", "drop --nproc, or torchrun")
        sys.exit(_run_under_torchrun(distributed.relaunch_command(sys.executable, sys.argv[1:], nproc)))
    if out is None and not dry_run:
        raise CompressError("no output directory given", "pass --out DIR (or --dry-run to only look)")
    sizes = {}
    for flag, value in (("--max-memory", max_memory), ("--shard-size", shard_size)):
        try:
            sizes[flag] = parse_size(value) if value is not None else None
        except ValueError as err:
            raise CompressError(f"{flag}: {err}") from None
    resolved = load_recipe(recipe, set_)
    options = RunOptions(data=data, batch_size=batch_size, eval_examples=eval_examples, device=device, seed=seed,
                         dry_run=dry_run, evaluate=not no_eval, calibration_examples=calibration_examples,
                         max_length=max_length, dtype=parse_dtype(dtype), sequential=sequential,
                         max_memory=sizes["--max-memory"], block_inputs=block_inputs, shard_bytes=sizes["--shard-size"],
                         shard=shard)
    progress = RichProgress(enabled=not as_json and distributed.from_env().is_main)
    source = open_source(checkpoint, weights)
    result = compress_source(source, resolved, out, options, progress, force=force)
    if result.rank != 0:  # under torchrun, rank 0 speaks for the run
        return
    if dry_run:
        plan = {"dry_run": True, "mode": result.mode, "stages": [r.to_dict() for r in result.stages],
                "memory": result.prediction.to_dict() if result.prediction else None}
        if as_json:
            _emit_json(plan)
        else:
            _print_plan(plan)
        return
    if as_json:
        _emit_json({"out": str(out), "report": result.report})
    else:
        _print_report(result.report, out)


def _run_under_torchrun(command: list[str]) -> int:
    """Run torchrun in the foreground and return its exit status. Ctrl-C reaches torchrun and its workers
    from the terminal; torchrun stops them, so this only waits for it."""
    import subprocess

    err_console.print("running: " + " ".join(command), highlight=False, soft_wrap=True)
    proc = subprocess.Popen(command)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return proc.wait()


@app.command("eval")
def eval_(checkpoint: CheckpointArg,
          baseline: Annotated[Optional[str], typer.Option("--baseline", help="The original, to compare side by side (default: the source a compresscli output records).")] = None,
          data: DataOpt = None, weights: WeightsOpt = None,
          baseline_weights: Annotated[Optional[Path], typer.Option("--baseline-weights", help="Weights for a timm:ARCH baseline.")] = None,
          examples: Annotated[Optional[int], typer.Option("--examples", help="Cap on held-out examples.")] = None,
          device: DeviceOpt = "auto", batch_size: BatchOpt = 32, as_json: JsonOpt = False) -> None:
    """Accuracy (or cosine / perplexity) of CHECKPOINT beside its original, on the same held-out data."""
    from compresscli.commands.evaluate import evaluate_pair

    result = evaluate_pair(checkpoint, baseline, weights=weights, baseline_weights=baseline_weights, data=data,
                           examples=examples, device=device, batch_size=batch_size,
                           progress=RichProgress(enabled=not as_json))
    if as_json:
        _emit_json(result)
    else:
        _print_eval(result)


@app.command()
def bench(checkpoint: CheckpointArg,
          baseline: Annotated[Optional[str], typer.Option("--baseline", help="The original (default: the source a compresscli output records).")] = None,
          weights: WeightsOpt = None,
          batch_sizes: Annotated[Optional[str], typer.Option("--batch-sizes", help="Comma-separated batch sizes to time (default 1,32; with --decode 1,8).")] = None,
          seq_len: Annotated[int, typer.Option("--seq-len", min=1, help="Tokens per sequence for text models.")] = 32,
          threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: torch's).")] = None,
          warmup: Annotated[int, typer.Option("--warmup", min=0)] = 3,
          repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed forwards per model and batch size.")] = 20,
          cpu_time: Annotated[bool, typer.Option("--cpu-time", help="Time this thread's CPU time, not the wall clock (with --threads 1; for busy machines).")] = False,
          decode: Annotated[bool, typer.Option("--decode", help="Time token-by-token generation of a causal LM (KV cache, 16-token prompt) and a prefill, against the bytes limit.")] = False,
          steps: Annotated[int, typer.Option("--steps", min=1, help="With --decode: timed generation steps per batch size.")] = 16,
          prefill_tokens: Annotated[int, typer.Option("--prefill-tokens", min=1, help="With --decode: prompt length of the timed prefill.")] = 512,
          device: DeviceOpt = "auto", as_json: JsonOpt = False) -> None:
    """End-to-end latency of CHECKPOINT against its original (median of alternating repeats), and the kernels that ran."""
    from compresscli.io.checkpoint import load_checkpoint
    from compresscli.training.distributed import pick_device
    from compresscli.commands.bench import compare_checkpoints, render_markdown

    try:
        sizes = tuple(int(b) for b in (batch_sizes or ("1,8" if decode else "1,32")).split(","))
        if min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise CompressError(f"--batch-sizes {batch_sizes!r} is not a list of positive integers", "write e.g. --batch-sizes 1,32") from None
    if decode:
        _bench_decode(checkpoint, baseline, weights, sizes, threads, steps, prefill_tokens, device, as_json)
        return
    dev = pick_device(device)
    if cpu_time and (threads != 1 or dev.type != "cpu"):
        raise CompressError("--cpu-time measures one thread's CPU time", "add --threads 1 (and --device cpu)")
    progress = RichProgress(enabled=not as_json)
    with progress.task("loading checkpoints"):
        ckpt = load_checkpoint(checkpoint, weights)
        base = load_checkpoint(baseline) if baseline else None
    with progress.task("timing"):
        result = compare_checkpoints(ckpt, base, batch_sizes=sizes, device=dev, warmup=warmup, repeats=repeats,
                                     threads=threads, seq_len=seq_len, clock="thread" if cpu_time else "wall")
    if as_json:
        _emit_json(result)
    else:
        out_console.print(render_markdown(result), markup=False, soft_wrap=True)


def _bench_decode(checkpoint: str, baseline: str | None, weights: str | None, sizes: tuple[int, ...],
                  threads: int | None, steps: int, prefill_tokens: int, device: str, as_json: bool) -> None:
    """`compress bench --decode`: each model in a fresh process on the CPU, one after the other."""
    from compresscli.commands.decode_compare import compare_decode, render_decode_markdown
    from compresscli.io.source import open_source

    if weights:
        raise CompressError("--decode reads Hugging Face causal LMs", "leave out --weights")
    if device not in ("auto", "cpu"):
        raise CompressError("--decode measures the CPU kernels", "leave out --device or pass --device cpu")
    if baseline is None:
        baseline = (open_source(checkpoint).compression or {}).get("source")
        if baseline is None:
            raise CompressError(f"{checkpoint} records no original to compare with", "pass --baseline ORIGINAL")
    with RichProgress(enabled=not as_json).task("timing generation (a fresh process per model)"):
        result = compare_decode(checkpoint, baseline, threads=threads, batches=sizes, steps=steps,
                                prefill_tokens=prefill_tokens)
    if as_json:
        _emit_json(result)
    else:
        out_console.print(render_decode_markdown(result), markup=False, soft_wrap=True)


@app.command()
def sweep(checkpoint: CheckpointArg,
          out: Annotated[Path, typer.Option("--out", "-o", help="Directory for sweep.json, sweep.md, pareto.png, runs/.")],
          methods: Annotated[str, typer.Option("--methods", help="Comma-separated: any method with a size (magnitude and its scores snip, synflow, grasp; ltr, rps, fips, condensed, ...).")] = "magnitude,ltr",
          ratios: Annotated[str, typer.Option("--ratios", help="Comma-separated compression ratios (dense bytes / bytes on disk).")] = "2,4,10,30,100",
          steps: Annotated[int, typer.Option("--steps", min=0, help="Recovery steps for every run.")] = 200,
          lr: Annotated[float, typer.Option("--lr", help="Recovery learning rate.")] = 1e-4,
          targets: Annotated[str, typer.Option("--targets", help="Comma-separated recipe targets.")] = "mlp",
          resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep in OUT.")] = False,
          keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Keep each run's model.safetensors.")] = False,
          points: Annotated[str, typer.Option("--points", help="Comma-separated recipes run once each, where their bytes put them (`quantized`: quantize at 8/4/3/2 bits and the composed recipes).")] = "",
          weights: WeightsOpt = None, data: DataOpt = None, device: DeviceOpt = "auto", batch_size: BatchOpt = 16,
          eval_examples: Annotated[Optional[int], typer.Option("--eval-examples", help="Cap on held-out examples.")] = None,
          seed: Annotated[int, typer.Option("--seed")] = 0, as_json: JsonOpt = False) -> None:
    """Every method at every compression ratio, same recovery budget and data: the memory-accuracy trade-off."""
    from compresscli.io.checkpoint import load_checkpoint
    from compresscli.engine.options import RunOptions
    from compresscli.commands.sweep import SweepOptions, run_sweep

    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise CompressError(f"--ratios {ratios!r} is not a list of numbers", "write e.g. --ratios 2,4,10") from None
    options = SweepOptions([m.strip() for m in methods.split(",") if m.strip()], ratio_list, steps=steps, lr=lr,
                           targets=[t.strip() for t in targets.split(",")], keep_checkpoints=keep_checkpoints,
                           points=[p.strip() for p in points.split(",") if p.strip()],
                           run=RunOptions(data=data, batch_size=batch_size, eval_examples=eval_examples, device=device,
                                          seed=seed))
    progress = RichProgress(enabled=not as_json)
    with progress.task("loading checkpoint"):
        ckpt = load_checkpoint(checkpoint, weights)

    def on_run(i: int, total: int, run_id: str, entry: dict) -> None:
        if as_json:
            return
        result = f"{entry['value']:.4f} at {entry['ratio']:.1f}x" if entry["status"] == "ok" else entry["status"]
        err_console.print(f"[bold]sweep {i}/{total}[/] {run_id}: {result} ({entry['seconds']} s)", highlight=False)

    state = run_sweep(ckpt, options, out, resume=resume, on_run=on_run)
    if as_json:
        _emit_json(state)
    else:
        out_console.print((out / "sweep.md").read_text(), markup=False)
        out_console.print(f"plot: {out / 'pareto.png'}")


@app.command("export")
def export_(out: Annotated[Path, typer.Argument(help="A compresscli output directory (written by `compress run`).")],
            to: Annotated[Path, typer.Option("--to", help="Directory to write (atomically).")],
            format_: Annotated[str, typer.Option("--format", help="dense: a plain Hugging Face or timm directory, pruned weights as zeros. compressed-tensors: quantized Linears as pack-quantized (plain transformers loads it), or magnitude-sparse / 2:4 layers in compressed-tensors' legacy sparse-bitmask / sparse-24-bitmask formats (Hugging Face only; other structures are refused, naming --format dense).")] = "dense",
            force: Annotated[bool, typer.Option("--force", help="Replace an existing, non-empty --to.")] = False,
            shard_size: Annotated[str, typer.Option("--shard-size", help="Largest weight file before sharding (Hugging Face; timm reads one file).")] = "2GiB",
            as_json: JsonOpt = False) -> None:
    """Write OUT as a plain checkpoint for transformers or timm (dense), or in compressed-tensors' sparse formats."""
    from compresscli.interop.export import export
    from compresscli.io.inspect import human_bytes
    from compresscli.io.safetensors import parse_size

    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as err:
        raise CompressError(f"--shard-size: {err}") from None
    result = export(out, to, format_, force=force, shard_bytes=shard_bytes, progress=RichProgress(enabled=not as_json))
    if as_json:
        _emit_json(result.to_dict())
        return
    stored = result.sparse_format or result.quant_format
    written = f"in {stored}" if stored else "dense"
    out_console.print(f"{result.kind} {result.model_class} ({result.format}) -> {result.to}: "
                      f"{', '.join(result.files)} ({human_bytes(result.bytes)}), "
                      f"{result.decoded_layers} compressed layers written {written}", highlight=False)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


@app.command()
def inspect(path: Annotated[str, typer.Argument(help="A checkpoint directory, a .safetensors file, or ref:NAME.")],
            top: Annotated[int, typer.Option("--top", help="Show the N largest layers (0: all).")] = 0,
            as_json: JsonOpt = False) -> None:
    """Where the memory goes, layer by layer, read from the safetensors header(s)."""
    from compresscli.io.inspect import human_bytes, inspect_path

    if path.startswith("ref:"):
        from compresscli.io.references import reference_path

        path = str(reference_path(path[4:]))
    result = inspect_path(Path(path))
    if as_json:
        _emit_json(result)
        return
    rows = result["layers"]
    if top:
        rows = sorted(rows, key=lambda r: -r["bytes"])[:top]
    t = result["totals"]
    cells = [{"layer": r["name"], "shape": "x".join(map(str, r["shape"])), "codec": r["codec"],
              "stored": f"{r['stored_params']:,}", "dense": f"{r['dense_params']:,}",
              "bytes": human_bytes(r["bytes"]), "in memory": human_bytes(r["memory_bytes"]),
              "ratio": f"{r['ratio']:.3f}"} for r in rows]
    total = {"layer": "total", "shape": "", "codec": "", "stored": f"{t['stored_params']:,}",
             "dense": f"{t['dense_params']:,}", "bytes": human_bytes(t["file_bytes"]),
             "in memory": human_bytes(t["memory_bytes"]), "ratio": f"{t['ratio']:.3f}"}
    out_console.print(_layer_table(str(path), cells, total, out_console.width))


NAME_WIDTH = 28  # room a layer name needs to be read whole (e.g. "encoder.layer.11.output.dense")


def _shorten(name: str, room: int) -> str:
    """`name` in at most `room` characters: its dotted parts abbreviated to their first letter from the
    left ("encoder.layer.1.attention.self.query" -> "e.l.1.attention.self.query"), numbers and the last
    part kept, so rows stay distinct; cut from the left with "…" only if that is not enough."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if len(".".join(parts)) <= room:
            break
        if not parts[i].isdigit():
            parts[i] = parts[i][:1]
    short = ".".join(parts)
    return short if len(short) <= room else "…" + short[-(room - 1):]


def _layer_table(title: str, cells: list[dict[str, str]], total: dict[str, str], width: int) -> Table:
    """The inspect table fitted to `width` columns: the shape, the dense count, then the stored count are
    dropped when the layer names would get fewer than NAME_WIDTH characters, and names too long for what is
    left are abbreviated from the left (`_shorten`), keeping the parts that tell layers apart."""
    columns = list(total)
    droppable = ["shape", "dense", "stored"]

    def others(cols: list[str]) -> int:  # each column: its widest cell, 2 of padding, 1 border
        return 1 + sum(max(len(c), *(len(row[c]) for row in [*cells, total])) + 3 for c in cols if c != "layer")

    while width - others(columns) - 3 < NAME_WIDTH and droppable:
        columns.remove(droppable.pop(0))
    room = max(16, width - others(columns) - 3)
    table = Table(title=title, caption="stored: parameters as stored (non-zeros; shared tensors once); "
                                       "dense: those of the layer it replaces; bytes: on disk; in memory: "
                                       "resident once loaded by compresscli.load")
    for col in columns:
        table.add_column(col, justify="left" if col in ("layer", "codec") else "right", no_wrap=True)
    for row in cells:
        table.add_row(*[_shorten(row["layer"], room) if c == "layer" else row[c] for c in columns])
    table.add_row(*[total[c] for c in columns], style="bold")
    return table


@app.command()
def recipes(name: Annotated[Optional[str], typer.Argument(help="Show this recipe in full.")] = None,
            as_json: JsonOpt = False) -> None:
    """The bundled recipes and what each does; with NAME, the recipe with every default filled in."""
    from compresscli.methods import METHODS
    from compresscli.engine.recipe import bundled_recipes, load_recipe

    if name:
        recipe = load_recipe(name)
        if as_json:
            _emit_json(recipe.to_dict())
        else:
            out_console.print(f"[bold]{name}[/]: {recipe.description}\n")
            out_console.print(recipe.to_yaml(), markup=False)
        return
    listing = [{"name": n, "description": load_recipe(n).description} for n in bundled_recipes()]
    methods = [{"method": m, "summary": METHODS.get(m).summary} for m in METHODS.names()]
    if as_json:
        _emit_json({"recipes": listing, "methods": methods})
        return
    for title, rows in (("bundled recipes (compress run CHECKPOINT --recipe NAME)",
                         [(r["name"], r["description"]) for r in listing]),
                        ("methods a recipe stage can use", [(m["method"], m["summary"]) for m in methods])):
        table = Table(title=title)
        table.add_column("name")
        table.add_column("what it does")
        for row in rows:
            table.add_row(*row)
        out_console.print(table)


@app.command()
def reference(name: Annotated[str, typer.Argument(help="minilm, digits-vit or mnist1d-vit.")],
              retrain: Annotated[bool, typer.Option("--retrain", help="Train a trained reference again.")] = False
              ) -> None:
    """Print the directory of a reference checkpoint, training it first if needed (digits-vit, mnist1d-vit)."""
    from compresscli.io.references import TRAINED, is_built, reference_path, train_reference
    from compresscli.core.cache import cache_dir

    if name in TRAINED and (retrain or not is_built(name)):
        with RichProgress(True).task(f"training {name}"):
            info = train_reference(name, cache_dir() / name)
        err_console.print(f"eval accuracy {info['eval_accuracy']:.4f} in {info['train_seconds']} s")
    out_console.print(str(reference_path(name)))


# ----------------------------------------------------------------------------- presentation

def _print_plan(plan: dict[str, Any]) -> None:
    from compresscli.io.inspect import human_bytes

    memory = plan["memory"]
    if memory:
        table = Table(title="predicted peak memory (RSS)")
        for col in ("mode", "peak", "made of (beyond the runtime's " + human_bytes(memory["baseline"]) + ")"):
            table.add_column(col)
        for mode, peak in (("whole-model", memory["whole_model"]), ("sequential", memory["sequential"])):
            parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in memory["phases"].get(mode, {}).items())
            shown = human_bytes(peak) if peak is not None else f"cannot run ({memory['sequential_problem']})"
            table.add_row(mode + (" (chosen)" if mode == plan["mode"] else ""), shown, parts)
        out_console.print(table)
        if memory.get("gpu"):
            out_console.print("predicted GPU peak: " + ", ".join(f"{m} {human_bytes(v)}" for m, v in memory["gpu"].items()))
    for step in plan["stages"]:
        table = Table(title=f"stage {step['stage']}: {step['method']} ({len(step['modules'])} modules)")
        table.add_column("")
        table.add_column("params", justify="right")
        table.add_column("bytes", justify="right")
        table.add_row("before", f"{step['params_before']:,}", human_bytes(step["bytes_before"]))
        table.add_row("after", f"{step['params_after']:,}", human_bytes(step["bytes_after"]))
        out_console.print(table)
        shown = step["modules"][:8]
        more = f" (+{len(step['modules']) - 8} more)" if len(step["modules"]) > 8 else ""
        out_console.print("  matches: " + (", ".join(shown) + more if shown else "the whole model (trains all parameters)"))


def _print_eval(result: dict[str, Any]) -> None:
    table = Table(title=f"{result['task']} on {result['data']} ({result['examples']} held-out)")
    for col in ("metric", "original", "compressed"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for m in result["metrics"]:
        table.add_row(m["name"], "-" if m["original"] is None else f"{m['original']:.4f}", f"{m['compressed']:.4f}")
    out_console.print(table)
    if "paired" in result:
        p = result["paired"]
        out_console.print(f"paired accuracy difference {p['delta']:+.4f} (95% CI {p['ci95'][0]:+.4f} .. {p['ci95'][1]:+.4f}); "
                          f"only original right: {p['only_original_right']}, only compressed right: {p['only_compressed_right']}")


def _print_report(report: dict[str, Any], out: Path) -> None:
    from compresscli.io.inspect import human_bytes

    t, m = report["memory"]["targeted"], report["memory"]["model"]
    table = Table(title=f"{report['source']['name']} -> {out}")
    for col in ("", "dense params", "stored params", "dense bytes", "on disk", "ratio"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("targeted layers", f"{t['dense_params']:,}", f"{t['stored_params']:,}", human_bytes(t["dense_bytes"]),
                  human_bytes(t["actual_bytes"]), f"{t['ratio']:.3f}")
    table.add_row("whole model", f"{m['dense_params']:,}", f"{m['stored_params']:,}", human_bytes(m["dense_bytes"]),
                  human_bytes(m["file_bytes"]), f"{m['ratio']:.3f}")
    out_console.print(table)
    if report.get("eval"):
        _print_eval(report["eval"])
    out_console.print(f"reload check: max abs diff {report['reload']['max_abs_diff']:.3g}; "
                      f"report: {out / 'report.md'}")


GLOBAL_FLAGS = ("--debug", "--verbose", "-v")


def global_flags_first(argv: list[str]) -> list[str]:
    """The global flags moved before the command, so `compress run ... --debug` (where every error message
    tells a user to add it) works as `compress --debug run ...` does."""
    return [a for a in argv if a in GLOBAL_FLAGS] + [a for a in argv if a not in GLOBAL_FLAGS]


def main() -> None:
    """Entry point: one line on stderr per error, non-zero exit, traceback only with --debug."""
    import signal

    from compresscli.core.resources import explain_out_of_memory, return_freed_memory_promptly

    return_freed_memory_promptly()
    # `kill` (and torchrun stopping its other workers when one fails) ends the run through the normal
    # exception path, so the temporary output directory and the lock are removed; exit status 143.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with explain_out_of_memory("the command", "free memory, or lower --batch-size and the numbers of examples"):
            code = app(args=global_flags_first(sys.argv[1:]), standalone_mode=False)  # Ctrl-C: exit code 130
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except CompressError as err:
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/] {err}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]: nothing was written", highlight=False)
        sys.exit(130)
    except Exception as err:  # a click usage error, or a bug
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        if _state["debug"]:
            raise
        from rich.markup import escape

        err_console.print(f"[red]error:[/] {type(err).__name__}: {escape(str(err))} (run with --debug for the "
                          "traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)
