"""Per-round metrics, progress lines and the run's output files.

Outputs in the run's directory: metrics.json (`rounds` and `summary`), metrics.csv,
model.ftc (codec file of the final weights and masks) and PNG plots.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Mapping

from shared import rundir
from shared.units import bytes_axis

PROGRESS_PREFIX = "[fedtiny]"
ROUND_FIELDS = ("round", "phase", "density", "accuracy", "loss", "bytes_up", "bytes_down", "seconds", "clients", "failures", "rejected", "dense_bytes", "train_loss", "federated_accuracy")


@dataclass
class RoundRecord:
    round: int
    phase: str
    density: float
    accuracy: float | None  # None: not evaluated this round (fl.eval_every)
    loss: float | None
    bytes_up: int
    bytes_down: int
    seconds: float
    clients: int = 0
    failures: int = 0  # sampled clients that failed or did not reply in time
    rejected: int = 0  # replies that arrived but were rejected (bad updates)
    dense_bytes: int = 0  # what dense float32 FedAvg would send this round, both ways (the reference)
    train_loss: float | None = None  # the clients' mean local training loss (sample-weighted); None: no training
    federated_accuracy: float | None = None  # clients' held-out accuracy of the global model; None: not evaluated


@dataclass
class Recorder:
    total_rounds: int
    rounds: list[RoundRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def add(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        r = record
        print(
            f"{PROGRESS_PREFIX} round {r.round}/{self.total_rounds} phase={r.phase} density={r.density:.4f} "
            f"accuracy={_fmt(r.accuracy)} loss={_fmt(r.loss)} up={r.bytes_up} down={r.bytes_down} "
            f"clients={r.clients} failures={r.failures} rejected={r.rejected} seconds={r.seconds:.2f}",
            flush=True,
        )

    def note(self, text: str) -> None:
        print(f"{PROGRESS_PREFIX} {text}", flush=True)

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        data = {"rounds": [asdict(r) for r in self.rounds], "summary": self.summary}
        _atomic_write(out / rundir.METRICS, json.dumps(data, indent=2))
        with open(out / rundir.METRICS_CSV, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROUND_FIELDS)
            writer.writeheader()
            writer.writerows(asdict(r) for r in self.rounds)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_title(config) -> str:
    """What a run's figures are of: method, target density, dataset and seed (a `shared.config.Config`)."""
    return f"{config.method}, density {config.pruning.density:g}, {config.dataset.name}, seed {config.seed}"


def plot(out: Path, rounds: list[RoundRecord], masks: Mapping[str, Any] | None = None, title: str = "") -> None:
    """accuracy.png (central test accuracy in %), bytes.png (cumulative payload bytes against dense
    FedAvg's for the same rounds and clients, in KB / MB / GB) and layer_density.png (each layer's
    density and the weights it keeps: where the budget went, and whether a layer was cut); every
    figure titled with the run. The overall density is the target in every round of a pruned run,
    so it is not plotted. Log axes show only positive values (round 0 sends no bytes when nothing
    is searched), so nothing is drawn at a made-up 1 byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for name, (label, log_y, series) in round_figures(rounds).items():
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for legend, (x, y) in series.items():
            ax.plot(x, y, marker="o", markersize=3, label=legend or None, linestyle="--" if legend.startswith("dense") else "-")
        if log_y:
            bytes_axis(ax.yaxis)
        if len(series) > 1:
            ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _finish(fig, ax, title, "round", label, out / rundir.ROUND_PLOTS[name], plt)
    if masks:
        _plot_kept(out, masks, title, plt)


def round_figures(rounds: list[RoundRecord]) -> dict[str, tuple[str, bool, dict[str, tuple[list, list]]]]:
    """What each per-round figure draws: {name: (y label, log y axis, {legend: (rounds, values)})};
    a log axis gets only the positive values."""
    evaluated = [r for r in rounds if r.accuracy is not None]
    xs = [r.round for r in rounds]
    figures = {
        "accuracy": ("central test accuracy (%)", False,
                     {"": ([r.round for r in evaluated], [100 * r.accuracy for r in evaluated])}),
        "bytes": ("cumulative payload bytes (up + down)", True, {
            "this run": (xs, list(accumulate(r.bytes_up + r.bytes_down for r in rounds))),
            "dense FedAvg, same rounds and clients": (xs, list(accumulate(r.dense_bytes for r in rounds))),
        }),
    }
    for label, log_y, series in figures.values():
        for legend, (x, y) in series.items():
            kept = [(a, b) for a, b in zip(x, y) if b > 0 or not log_y]
            series[legend] = ([a for a, _ in kept], [b for _, b in kept])
    return figures


def _plot_kept(out: Path, masks: Mapping[str, Any], title: str, plt) -> None:
    """Each layer's density (%), labelled with the weights it keeps of its total: where the budget
    went, and which layer is cut (0%: layer collapse, Tanaka et al., arXiv 2006.05467)."""
    kept = {name: (int(m.sum()), m.numel()) for name, m in masks.items()}
    fig, ax = plt.subplots(figsize=(max(5.5, 0.5 * len(kept)), 3.8))
    bars = ax.bar(range(len(kept)), [100 * k / n for k, n in kept.values()])
    for bar, (k, n) in zip(bars, kept.values()):
        ax.annotate(f"{k:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=6)
    total_kept, total = sum(k for k, _ in kept.values()), sum(n for _, n in kept.values())
    ax.axhline(100 * total_kept / max(1, total), color="C1", linestyle="--", label=f"overall {total_kept / max(1, total):.2%}")
    ax.legend(fontsize=7)
    ax.set_xticks(range(len(kept)), [f"{name}\n({n:,})" for name, (_, n) in kept.items()], rotation=70, fontsize=6)
    _finish(fig, ax, title, "layer (weights)", "density (% of the layer kept)", out / rundir.LAYER_DENSITY_PLOT, plt)


def _finish(fig, ax, title: str, xlabel: str, ylabel: str, path: Path, plt) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
