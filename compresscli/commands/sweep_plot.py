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
             f"seed {cfg['seed']}. Ratio = dense bytes of the targeted weights (in the checkpoint's own dtype) / their "
             f"actual bytes on disk; relative bytes = its inverse.", "",
             f"Original {metric}: {original:.4f}" if original is not None else "", "",
             f"## {metric} by method and target ratio", "",
             "| method | " + " | ".join(f"{r:g}x" for r in cfg["ratios"]) + " |",
             "|---|" + "---|" * len(cfg["ratios"])]
    for method in cfg["methods"] if cfg["ratios"] else []:
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
    points = [r for r in ok if r.get("point")]
    if points:
        lines += ["", "## Quantized and composed points (recipes whose size their settings fix)", "",
                  "| recipe | relative bytes | ratio | " + metric + " |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['bytes'] / r['dense_bytes']:.4f} | {r['ratio']:.1f}x | {r['value']:.4f} |"
                  for r in sorted(points, key=lambda r: r["bytes"])]
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
    """Metric vs bytes on disk relative to the targets' bytes in the checkpoint's own dtype (log x; a bfloat16
    checkpoint's 1.0 is its bfloat16 bytes), one line per method, one marker per point, the original as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = _ok(state)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    relative = (lambda r: r["bytes"] / r["dense_bytes"])  # noqa: E731
    for method in state["config"]["methods"]:
        line = sorted((relative(r), r["value"]) for r in ok if r["method"] == method and not r.get("point"))
        if line:
            ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=method)
    for r in (r for r in ok if r.get("point")):
        ax.scatter(relative(r), r["value"], marker="D", s=28, zorder=3)
        ax.annotate(r["method"], (relative(r), r["value"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if ok:
        ax.axhline(ok[0]["original"], color="black", linestyle="--", linewidth=1, label="original")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1, label="original size")
        ax.set_ylabel(ok[0]["metric"])
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a log axis overlap
    ax.set_xlabel("bytes of the targeted weights / their bytes in the checkpoint's dtype (log scale)")
    ax.set_title(f"memory vs accuracy: {Path(state['config']['source']).name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
