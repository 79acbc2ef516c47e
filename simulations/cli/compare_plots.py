"""The plots of `fedtiny compare`: accuracy against density, against the round and against the bytes sent.

Accuracy is in % (as in a run's own plots), round axes have integer ticks, byte axes read in
KB / MB / GB (shared.units). Curves are means over seeds; the centralized ceiling, which has no
rounds, is a dotted line.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Mapping, Sequence

from shared import rundir
from shared.units import bytes_axis


def plot(results: Mapping, summary: Sequence[dict], out: Path, dense: str) -> list[Path]:
    """accuracy_vs_density.png, accuracy_vs_round.png and accuracy_vs_bytes.png (one panel per density).

    `results` maps each cell (`.method`, `.density`) to its metrics.json content, `summary` is
    `compare.summarize` of their rows, `dense` names the dense reference drawn as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(c.method for c in results))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    paths = [_accuracy_vs_density(summary, methods, colors, dense, out, plt)]
    densities = sorted({c.density for c in results if c.method != dense}) or [1.0]
    for by_bytes, name in ((False, rundir.COMPARISON_PLOTS["round"]), (True, rundir.COMPARISON_PLOTS["bytes"])):
        fig, axes = plt.subplots(1, len(densities), figsize=(5 * len(densities), 3.6), squeeze=False)
        for ax, d in zip(axes[0], densities):
            _panel(ax, results, methods, colors, dense, d, by_bytes)
        axes[0][0].legend(fontsize=7)
        paths.append(_save(fig, out / name, plt))
    return paths


def _accuracy_vs_density(summary, methods, colors, dense: str, out: Path, plt) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = sorted((s for s in summary if s["method"] == m), key=lambda s: s["density"])
        if m == dense:
            for s in pts:
                ax.axhline(100 * s["accuracy"], color=colors[m], linestyle="--", label=f"{m} (dense)")
            continue
        ax.errorbar([s["density"] for s in pts], [100 * s["accuracy"] for s in pts],
                    yerr=[100 * s["accuracy_std"] for s in pts], marker="o", capsize=3, color=colors[m], label=m)
    ax.set_xscale("log")
    ax.set_xlabel("density (fraction of prunable weights kept)")
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / rundir.COMPARISON_PLOTS["density"], plt)


def _panel(ax, results: Mapping, methods, colors, dense: str, density: float, by_bytes: bool) -> None:
    """One density's curves: accuracy (%) against the round, or against the cumulative bytes (log axis)."""
    from matplotlib.ticker import MaxNLocator

    for m in methods:
        curves = [_curve(metrics) for c, metrics in results.items() if c.method == m and (c.density == density or m == dense)]
        if not curves:
            continue
        rounds, acc, total = _mean_curve(curves)
        if len(rounds) == 1:  # not federated (the centralized ceiling): one final figure, a line
            ax.axhline(100 * acc[0], color=colors[m], linestyle=":", label=f"{m} (ceiling)")
            continue
        xs = total if by_bytes else rounds
        points = [(x, 100 * a) for x, a in zip(xs, acc) if x > 0 or not by_bytes]  # a log axis: bytes > 0 only
        ax.plot(*zip(*points), color=colors[m], label=m, linestyle="--" if m == dense else "-")
    if by_bytes:
        bytes_axis(ax.xaxis)
        ax.set_xlabel("cumulative payload bytes (up + down)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
    ax.set_title(f"density {density:g}")
    ax.set_ylabel("test accuracy (%, mean over seeds)")
    ax.grid(alpha=0.3)


def _curve(metrics: dict) -> tuple[list[int], list[float], list[float]]:
    """(round, accuracy, cumulative bytes) of the evaluated rounds (fl.eval_every skips some)."""
    total, points = 0, []
    for r in metrics.get("rounds", []):
        total += r["bytes_up"] + r["bytes_down"]
        if r["accuracy"] is not None:
            points.append((r["round"], r["accuracy"], total))
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def _mean_curve(curves):
    n = min(len(c[0]) for c in curves)
    mean = lambda i: [statistics.fmean(c[i][k] for c in curves) for k in range(n)]  # noqa: E731
    return curves[0][0][:n], mean(1), mean(2)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
