"""The sweep's outputs for people: a method x ratio table (sweep.md) and the Pareto plot (pareto.png)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from compresscli.io.inspect import human_bytes


def _ok(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in state["runs"].values() if r.get("status") == "ok"]


def sweep_markdown(state: dict[str, Any]) -> str:
    cfg = state["config"]
    runs = state["runs"]
    ok = _ok(state)
    metric = ok[0]["metric"] if ok else "metric"
    original = ok[0]["original"] if ok else None
    lines = [f"# Sweep: {cfg['source']}", "",
             f"Data `{cfg['data']}`, targets {cfg['targets']}, {cfg['steps']} recovery steps per run (lr {cfg['lr']:g}), "
             f"seed {cfg['seed']}. Ratio = dense bytes of the targeted weights / their actual bytes on disk.", "",
             f"Original {metric}: {original:.4f}" if original is not None else "", "",
             f"## {metric} by method and target ratio", "",
             "| method | " + " | ".join(f"{r:g}x" for r in cfg["ratios"]) + " |",
             "|---|" + "---|" * len(cfg["ratios"])]
    for method in cfg["methods"]:
        cells = []
        for ratio in cfg["ratios"]:
            run = runs.get(f"{method}-x{ratio:g}")
            if run is None:
                cells.append("not run")
            elif run["status"] == "ok":
                cells.append(f"{run['value']:.4f} ({run['ratio']:.1f}x)")
            else:
                cells.append(run["status"])
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "## Every run", "",
              "| run | status | metric | params kept | bytes on disk | measured ratio | seconds | note |",
              "|---|---|---|---|---|---|---|---|"]
    for run_id, run in runs.items():
        if run["status"] == "ok":
            lines.append(f"| {run_id} | ok | {run['value']:.4f} | {run['stored_params']:,} / {run['dense_params']:,} | "
                         f"{human_bytes(run['bytes'])} | {run['ratio']:.2f} | {run['seconds']} | "
                         + ", ".join(f"{k}={v:.4g}" for k, v in run.get("knob", {}).items()) + " |")
        else:
            lines.append(f"| {run_id} | {run['status']} | - | - | - | - | {run['seconds']} | {run.get('error', '')} |")
    return "\n".join(lines) + "\n"


def pareto_plot(state: dict[str, Any], path: Path) -> None:
    """Metric vs bytes on disk (log x), one line per method, the original as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = _ok(state)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in state["config"]["methods"]:
        points = sorted((r["bytes"], r["value"]) for r in ok if r["method"] == method)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    if ok:
        ax.axhline(ok[0]["original"], color="black", linestyle="--", linewidth=1, label="original")
        ax.axvline(ok[0]["dense_bytes"], color="grey", linestyle=":", linewidth=1, label="original size")
        ax.set_ylabel(ok[0]["metric"])
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: human_bytes(value)))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a log axis overlap
    ax.set_xlabel("bytes on disk of the targeted weights (log scale)")
    ax.set_title(f"memory vs accuracy: {Path(state['config']['source']).name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
