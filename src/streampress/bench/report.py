"""The speed report: ratios to dense, a terminal table, Markdown, JSON and a 2x2 plot.

Everything here works on a plain *result* dict, so the report can be tested (and re-rendered
from a saved ``bench.json``) without a model::

    {"config": {"model": ..., "device": ..., "dtype": ..., "frames": ..., "frame_size": [W, H],
                "fps": ..., "question": ..., "peak_memory": "<how peak memory was measured>", ...},
     "runs": [{"name": "dense", "method": None, "params": {}, "cacher": None, "frames": 16,
               "encode_ms": ..., "prune_ms": ..., "prefill_ms": ..., "total_ms": ...,   # per frame
               "ttft_ms": ..., "tokens_seen": ..., "tokens_kept": ..., "kv_bytes": ...,
               "peak_bytes": ..., "answer": "..."},
              ...]}

The baseline is the run named ``"dense"``; :func:`add_ratios` gives every run its ratios to it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "add_ratios", "render_markdown", "render_table", "plot", "write_report",
           "format_bytes", "json_default"]

# (key, column title, unit); per-frame times are the mean over the stream's frames.
METRICS = [
    ("encode_ms", "encoder", "ms/frame"),
    ("prune_ms", "pruning", "ms/frame"),
    ("prefill_ms", "prefill", "ms/frame"),
    ("total_ms", "total", "ms/frame"),
    ("ttft_ms", "first token", "ms"),
    ("tokens_kept", "visual tokens kept", "tokens"),
    ("kv_bytes", "KV cache", "bytes"),
    ("peak_bytes", "peak memory", "bytes"),
]
_STAGES = [("encode_ms", "encoder", "#4C72B0"), ("prune_ms", "pruning", "#DD8452"),
           ("prefill_ms", "prefill", "#55A868")]
BASELINE = "dense"
# Dense does no pruning: its pruning time is only bookkeeping, so a ratio to it means nothing.
_NO_RATIO = {"prune_ms"}


def _baseline(result: dict) -> dict:
    runs = result.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError("result['runs'] must be a non-empty list of runs")
    dense = [r for r in runs if r.get("name") == BASELINE]
    if len(dense) != 1:
        raise ValueError(f"result must hold exactly one run named {BASELINE!r} (the baseline), "
                         f"found {len(dense)}")
    return dense[0]


def add_ratios(result: dict) -> dict:
    """Add ``run["ratios"][metric] = run[metric] / dense[metric]`` (None where dense is 0 or a
    value is missing) and ``run["speedup"] = dense total / run total`` to every run, in place."""
    dense = _baseline(result)
    for run in result["runs"]:
        ratios = {}
        for key, _, _ in METRICS:
            base, value = dense.get(key), run.get(key)
            ratios[key] = (value / base) if (base and value is not None and key not in _NO_RATIO) else None
        run["ratios"] = ratios
        total = run.get("total_ms")
        run["speedup"] = dense["total_ms"] / total if total and dense.get("total_ms") else None
    return result


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _format_value(key: str, value) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        return format_bytes(value)
    if key.startswith("tokens"):
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _cell(run: dict, key: str) -> tuple[str, str]:
    ratio = run.get("ratios", {}).get(key)
    return _format_value(key, run.get(key)), ("-" if ratio is None else f"{ratio:.2f}x")


def _run_label(run: dict) -> str:
    return run["name"]


def _describe_config(config: dict) -> list[str]:
    size = config.get("frame_size")
    lines = [
        f"model: {config.get('model', '?')}" + (f" ({config['model_detail']})" if config.get("model_detail") else ""),
        f"device: {config.get('device', '?')}, dtype {config.get('dtype', '?')}, "
        f"torch threads {config.get('threads', '?')}",
        f"video: {config.get('video', '?')}, {config.get('frames', '?')} frames"
        + (f" at {size[0]}x{size[1]}" if size else "") + (f", {config['fps']:g} fps" if config.get("fps") else ""),
        f"question (for time to first token): {config.get('question', '?')!r}",
        f"peak memory: {config.get('peak_memory', '?')}",
    ]
    if config.get("keep_ratio") is not None:
        lines.insert(3, f"keep ratio (methods that take one): {config['keep_ratio']}")
    return lines


def render_markdown(result: dict) -> str:
    """The report as Markdown: configuration, then one row per run with ratios to dense."""
    if not all("ratios" in r for r in result["runs"]):
        add_ratios(result)
    lines = ["# streampress bench", ""]
    lines += [f"- {line}" for line in _describe_config(result.get("config", {}))]
    lines += ["", "Times are means per video frame; each cell shows the value and its ratio to the dense run "
                  "(same frames, same process).", ""]
    header = ["run", "parameters"] + [f"{title} ({unit})" if unit not in ("bytes", "tokens") else title
                                      for _, title, unit in METRICS] + ["speedup"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(METRICS) + 1)) + "|")
    for run in result["runs"]:
        cells = [_run_label(run), _params_text(run)]
        for key, _, _ in METRICS:
            value, ratio = _cell(run, key)
            cells.append(f"{value} ({ratio})")
        cells.append("-" if run.get("speedup") is None else f"{run['speedup']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    answers = [r for r in result["runs"] if r.get("answer") is not None]
    if any(r["answer"] for r in answers):
        lines += ["", "Answers (random weights give arbitrary text; shown to prove the full path ran):", ""]
        lines += [f"- {r['name']}: {r['answer']!r}" for r in answers]
    return "\n".join(lines) + "\n"


def _params_text(run: dict) -> str:
    parts = [f"{k}={v}" for k, v in (run.get("params") or {}).items()]
    if run.get("cacher"):
        parts.append("cacher(" + ", ".join(f"{k}={v}" for k, v in run["cacher"].items()) + ")")
    return ", ".join(parts) or "-"


def render_table(result: dict):
    """A ``rich.table.Table`` of the report: one column per run, one row per metric, each cell
    the value and (dimmed, below it) its ratio to dense. Runs as columns keep it within an
    80-column terminal for the default set of runs."""
    from rich import box
    from rich.table import Table

    if not all("ratios" in r for r in result["runs"]):
        add_ratios(result)
    config = result.get("config", {})
    runs = result["runs"]
    table = Table(title=f"streampress bench: {config.get('model', '?')}\n{config.get('device', '?')}",
                  caption="value, and below it the ratio to dense (same frames, same process)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("", style="bold", no_wrap=True)
    for run in runs:  # break long names at underscores so they wrap instead of truncating
        table.add_column(_run_label(run).replace("_", "_\n").replace("+", "\n+"), justify="right",
                         no_wrap=True)
    for key, title, unit in METRICS:
        unit = {"bytes": "MiB", "tokens": ""}.get(unit, unit)
        cells = []
        for run in runs:
            value = run.get(key)
            text = "-" if value is None else (f"{value / 2**20:.1f}" if key.endswith("_bytes")
                                              else _format_value(key, value))
            ratio = run.get("ratios", {}).get(key)
            cells.append(f"{text}\n[dim]{'-' if ratio is None else f'{ratio:.2f}x'}[/dim]")
        table.add_row(f"{title}\n[dim]{unit}[/dim]" if unit else title, *cells)
    table.add_row("speedup", *["-" if r.get("speedup") is None else f"[bold]{r['speedup']:.2f}x[/bold]"
                               for r in runs])
    return table


def plot(result: dict, path: str | Path) -> Path:
    """Write a 2x2 figure: time per frame by stage, visual tokens kept, memory, speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not all("ratios" in r for r in result["runs"]):
        add_ratios(result)
    runs, config = result["runs"], result.get("config", {})
    names = [_run_label(r) for r in runs]
    x = np.arange(len(runs))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    (ax_time, ax_tokens), (ax_mem, ax_speed) = axes

    bottom = np.zeros(len(runs))
    for key, label, color in _STAGES:
        values = np.array([r.get(key) or 0.0 for r in runs])
        if values.max() < 0.02 * max(bottom.max(), 1e-9):  # too thin to see: say its size
            label = f"{label} (at most {values.max():.2g} ms)"
        ax_time.bar(x, values, bottom=bottom, label=label, color=color)
        bottom += values
    for xi, total in zip(x, bottom):
        ax_time.annotate(f"{total:.0f}", (xi, total), ha="center", va="bottom", fontsize=9)
    ax_time.set_title("Time per frame by stage")
    ax_time.set_ylabel("milliseconds per frame")
    ax_time.set_ylim(0, max(bottom.max(), 1e-9) * 1.35)  # headroom: the legend never hides a bar
    ax_time.legend(loc="upper right", ncol=3, fontsize=8)

    kept = np.array([r.get("tokens_kept") or 0 for r in runs], dtype=float)
    ax_tokens.bar(x, kept, color="#8172B2")
    for xi, run, value in zip(x, runs, kept):
        ratio = run["ratios"].get("tokens_kept")
        ax_tokens.annotate(f"{value:,.0f}" + (f"\n{ratio:.0%}" if ratio is not None else ""),
                           (xi, value), ha="center", va="bottom", fontsize=9)
    ax_tokens.set_title("Visual tokens kept (whole stream)")
    ax_tokens.set_ylabel("tokens")
    ax_tokens.set_ylim(0, max(kept.max(), 1) * 1.25)

    width = 0.38
    mib = 1024 ** 2
    kv = np.array([(r.get("kv_bytes") or 0) / mib for r in runs])
    peak = np.array([(r.get("peak_bytes") or 0) / mib for r in runs])
    ax_mem.bar(x - width / 2, kv, width, label="KV cache", color="#C44E52")
    ax_mem.bar(x + width / 2, peak, width, label="peak memory", color="#937860")
    for offset, values in ((-width / 2, kv), (width / 2, peak)):
        for xi, value in zip(x, values):
            ax_mem.annotate(f"{value:,.0f}" if value >= 100 else f"{value:.3g}", (xi + offset, value), ha="center", va="bottom", fontsize=8)
    ax_mem.set_title("KV cache after the stream, and peak memory")
    ax_mem.set_ylabel("MiB (log scale)")
    ax_mem.set_yscale("symlog", linthresh=1.0)
    ax_mem.set_ylim(0, max(kv.max(), peak.max(), 1.0) * 30)
    ax_mem.legend(loc="upper left", ncol=2, fontsize=8,
                  title=config.get("peak_memory_short") or None, title_fontsize=8)

    groups = [("total_ms", "total per frame"), ("encode_ms", "encoder"), ("prefill_ms", "prefill"),
              ("ttft_ms", "first token")]
    width = 0.8 / len(groups)
    for i, (key, label) in enumerate(groups):
        speed = [1.0 / r["ratios"][key] if r["ratios"].get(key) else 0.0 for r in runs]
        ax_speed.bar(x + (i - (len(groups) - 1) / 2) * width, speed, width, label=label)
    ax_speed.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax_speed.set_title("Speedup over dense (higher is better)")
    ax_speed.set_ylabel("dense time / method time (x)")
    ax_speed.legend(loc="upper left", ncol=2, fontsize=8)
    ax_speed.set_ylim(0, max([1.0] + [h.get_height() for h in ax_speed.patches]) * 1.2)

    for ax in axes.flat:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    size = config.get("frame_size")
    detail = [f"{config.get('device', '?')}, {config.get('dtype', '?')}",
              f"{config.get('frames', '?')} frames" + (f" {size[0]}x{size[1]}" if size else "")
              + (f" at {config['fps']:g} fps" if config.get("fps") else "")]
    if config.get("keep_ratio") is not None:
        detail.append(f"keep ratio {config['keep_ratio']:g}")
    fig.suptitle(f"streampress bench: {config.get('model', '?')}\n" + " | ".join(detail), fontsize=12)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir`` (created if needed)."""
    add_ratios(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(result, indent=2, default=json_default) + "\n")
    paths["md"].write_text(render_markdown(result))
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(f"bench.png needs matplotlib: pip install 'streampress[bench]' "
                          f"({paths['json']} and {paths['md']} were written)")
    plot(result, paths["png"])
    return paths


def json_default(value: Any):
    """JSON for numpy / torch values (scalars and arrays), else their text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)
