"""The speed report: ratios to dense, a terminal table, Markdown, JSON and a 2x2 plot.

Everything here works on a plain *result* dict, so the report can be tested (and re-rendered
from a saved ``bench.json``) without a model::

    {"config": {"model": ..., "device": ..., "dtype": ..., "frames": ..., "frame_size": [W, H],
                "fps": ..., "question": ..., "peak_memory": "<how peak memory was measured>", ...},
     "runs": [{"name": "dense", "method": None, "params": {}, "cacher": None, "frames": 16,
               "encode_ms": ..., "prune_ms": ..., "prefill_ms": ..., "total_ms": ...,   # per frame
               "ttft_ms": ..., "tokens_seen": ..., "tokens_kept": ..., "kv_bytes": ...,
               "peak_bytes": ..., "answer": "...",
               # optional, from the interleaved runner (see streampress.bench.runner):
               "stats": {"encode_ms": {"median", "q1", "q3", "min", "max", "n"}, ...},
               "paired_ratios": {"encode_ms": {"median", "q1", "q3", ...}, ...},   # vs dense
               "samples": {"encode_ms": [per-frame ms, ...], ...}},
              ...],
     "noise": {"controls": {"stc": 1.02, ...}, "noisy": False, "threshold": 0.1, "message": "..."}}

The baseline is the run named ``"dense"``; :func:`add_ratios` gives every run its ratios to it
(the median paired ratio where the runner measured pairs, else value / dense value) and the
result its :func:`noise_check`: why a report says "machine too noisy" rather than printing
ratios that only reflect what else the machine was doing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..formatting import format_bytes, json_default

__all__ = ["METRICS", "NOISE_THRESHOLD", "add_ratios", "noise_check", "render_markdown", "render_table", "plot",
           "write_report"]

# (key, column title, unit); per-frame times are medians over per-frame samples.
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
# A same-work control (a pruning method's encoder time over dense's: identical work) further
# than this from 1.0 means the machine, not the method, decided the timings.
NOISE_THRESHOLD = 0.1


def _baseline(result: dict) -> dict:
    runs = result.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError("result['runs'] must be a non-empty list of runs")
    dense = [r for r in runs if r.get("name") == BASELINE]
    if len(dense) != 1:
        raise ValueError(f"result must hold exactly one run named {BASELINE!r} (the baseline), "
                         f"found {len(dense)}")
    return dense[0]


def _ratio(run: dict, dense: dict, key: str) -> float | None:
    """``run``'s ratio to ``dense`` for ``key``: the median paired ratio where the runner
    measured pairs, else ``run[key] / dense[key]`` (None where dense is 0 or a value is missing)."""
    paired = (run.get("paired_ratios") or {}).get(key)
    if paired:
        return paired["median"]
    base, value = dense.get(key), run.get(key)
    return value / base if base and value is not None else None


def add_ratios(result: dict) -> dict:
    """Add ``run["ratios"][metric]`` to every run, in place: the median of per-sample paired
    ratios to dense where the run has ``paired_ratios``, else ``run[metric] / dense[metric]``
    (None where dense is 0, a value is missing or the metric is pruning time); add
    ``run["speedup"] = 1 / ratios["total_ms"]`` and ``result["noise"] = noise_check(result)``."""
    dense = _baseline(result)
    for run in result["runs"]:
        ratios = {key: None if key in _NO_RATIO else _ratio(run, dense, key) for key, _, _ in METRICS}
        run["ratios"] = ratios
        run["speedup"] = 1.0 / ratios["total_ms"] if ratios.get("total_ms") else None
    result["noise"] = noise_check(result)
    return result


def _ensure_ratios(result: dict) -> None:
    """:func:`add_ratios` unless every run has its ratios and the result its noise check."""
    if not all("ratios" in r for r in result["runs"]) or "noise" not in result:
        add_ratios(result)


def noise_check(result: dict, threshold: float = NOISE_THRESHOLD) -> dict:
    """The same-work control: every run with a pruning method and no cacher encodes exactly
    what dense encodes, so its encoder time over dense's (the median paired ratio, else the
    ratio of the values) should be 1.0. Returns ``{"controls": {run: ratio}, "noisy": bool, or
    None when no run is a control, "threshold", "message"}``."""
    dense = _baseline(result)
    controls = {}
    for run in result["runs"]:
        if run.get("method") and not run.get("cacher") and run is not dense:
            ratio = _ratio(run, dense, "encode_ms")
            if ratio is not None:
                controls[run["name"]] = float(ratio)
    off = {name: r for name, r in controls.items() if abs(r - 1.0) > threshold}
    listed = ", ".join(f"{name} {r:.2f}x" for name, r in (off or controls).items())
    if not controls:
        noisy, message = None, ("no same-work control available (no pruning method without the cacher): "
                                "timing noise was not checked")
    elif off:
        noisy, message = True, (f"machine too noisy: same-work control outside 1.00 +- {threshold:.2f} "
                                f"(encoder time vs dense, identical work): {listed}; the speed ratios reflect "
                                "the machine's load, not the methods. Rerun on an idle machine.")
    else:
        noisy, message = False, (f"same-work control within 1.00 +- {threshold:.2f} (encoder time vs dense, "
                                 f"identical work): {listed}")
    return {"controls": controls, "noisy": noisy, "threshold": threshold, "message": message}


def _spread(run: dict, key: str) -> str | None:
    """Half the interquartile range as a percentage of the median, e.g. "+-3%"."""
    stats = (run.get("stats") or {}).get(key)
    if not stats or not stats.get("median"):
        return None
    return f"+-{50 * (stats['q3'] - stats['q1']) / abs(stats['median']):.0f}%"


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
    _ensure_ratios(result)
    lines = ["# streampress bench", ""]
    lines += [f"- {line}" for line in _describe_config(result.get("config", {}))]
    noise = result["noise"]
    lines += ["", ("**" + noise["message"] + "**") if noise["noisy"] else noise["message"]]
    lines += ["", "Each cell shows the value and its ratio to the dense run (same frames, same process)."
                  + (f" Timing: {result['config']['timing']}; +-N% is half the interquartile range."
                     if result.get("config", {}).get("timing") else ""), ""]
    header = ["run", "parameters"] + [f"{title} ({unit})" if unit not in ("bytes", "tokens") else title
                                      for _, title, unit in METRICS] + ["speedup"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(METRICS) + 1)) + "|")
    for run in result["runs"]:
        cells = [_run_label(run), _params_text(run)]
        for key, _, _ in METRICS:
            value, ratio = _cell(run, key)
            spread = _spread(run, key)
            cells.append(f"{value}{' ' + spread if spread else ''} ({ratio})")
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
    the value, its spread and (dimmed, below it) its ratio to dense; the noise check's line
    below (bold red "machine too noisy: ..." when the same-work control fails). Runs as
    columns keep it within an 80-column terminal for the default set of runs."""
    from rich import box
    from rich.table import Table

    _ensure_ratios(result)
    config = result.get("config", {})
    runs = result["runs"]
    noise = result["noise"]
    caption = "value, and below it the ratio to dense (same frames, same process)"
    if any(r.get("stats") for r in runs):
        caption = ("median over per-frame samples, +-N% = half the interquartile range, and below it the median "
                   "paired ratio to dense (interleaved, same frames, same process)")
    style = "bold red" if noise["noisy"] else ("yellow" if noise["noisy"] is None else "green")
    table = Table(title=f"streampress bench: {config.get('model', '?')}\n{config.get('device', '?')}",
                  caption=f"{caption}\n[{style}]{noise['message']}[/{style}]",
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
            spread = _spread(run, key)
            lines = [text] + ([f"[dim]{spread}[/dim]"] if spread else []) + [
                f"[dim]{'-' if ratio is None else f'{ratio:.2f}x'}[/dim]"]
            cells.append("\n".join(lines))
        table.add_row(f"{title}\n[dim]{unit}[/dim]" if unit else title, *cells)
    table.add_row("speedup", *["-" if r.get("speedup") is None else f"[bold]{r['speedup']:.2f}x[/bold]"
                               for r in runs])
    if noise["controls"]:
        table.add_row(f"[{style}]same-work control[/{style}]\n[dim]encoder vs dense[/dim]",
                      *[f"[{style}]{noise['controls'][r['name']]:.2f}x[/{style}]" if r["name"] in noise["controls"]
                        else "-" for r in runs])
    return table


def plot(result: dict, path: str | Path) -> Path:
    """Write a 2x2 figure: time per frame by stage, visual tokens kept, memory, speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    _ensure_ratios(result)
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
    spreads = [(r.get("stats") or {}).get("total_ms") for r in runs]
    tops = bottom.copy()
    if all(spreads):  # median and interquartile range of the per-frame total (bars: stage medians)
        ax_time.errorbar(x, [s["median"] for s in spreads], fmt="none", ecolor="black", capsize=4, linewidth=1,
                         yerr=[[s["median"] - s["q1"] for s in spreads], [s["q3"] - s["median"] for s in spreads]])
        tops = np.maximum(tops, [s["q3"] for s in spreads])
    for xi, total, top in zip(x, bottom, tops):
        ax_time.annotate(f"{total:.0f}", (xi, top), ha="center", va="bottom", fontsize=9)
    ax_time.set_title("Time per frame by stage")
    ax_time.set_ylabel("milliseconds per frame")
    ax_time.set_ylim(0, max(tops.max(), 1e-9) * 1.35)  # headroom: the legend never hides a bar
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
            ax_mem.annotate(f"{value:,.0f}" if value >= 100 else f"{value:.3g}", (xi + offset, value),
                            ha="center", va="bottom", fontsize=8)
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
    title = f"streampress bench: {config.get('model', '?')}\n" + " | ".join(detail)
    if result["noise"]["noisy"]:
        title += "\nMACHINE TOO NOISY: same-work control " + ", ".join(
            f"{k} {v:.2f}x" for k, v in result["noise"]["controls"].items()) + " (should be 1.00x)"
    fig.suptitle(title, fontsize=12, color="darkred" if result["noise"]["noisy"] else "black")
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


