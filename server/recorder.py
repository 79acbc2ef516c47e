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
from pathlib import Path
from typing import Any

from shared import rundir

PROGRESS_PREFIX = "[fedtiny]"
ROUND_FIELDS = ("round", "phase", "density", "accuracy", "loss", "bytes_up", "bytes_down", "seconds", "clients", "failures", "rejected", "train_loss", "federated_accuracy")


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


def plot(out: Path, rounds: list[RoundRecord], layer_density: dict[str, float]) -> None:
    """Accuracy, density and bytes per round, and per-layer density of the final masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [r for r in rounds if r.accuracy is not None]
    for name, xs, ys, label in (
        ("accuracy", [r.round for r in evaluated], [r.accuracy for r in evaluated], "central test accuracy"),
        ("density", [r.round for r in rounds], [r.density for r in rounds], "density of prunable weights"),
        ("bytes", [r.round for r in rounds], [r.bytes_up + r.bytes_down for r in rounds], "payload bytes (up + down)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / rundir.ROUND_PLOTS[name], dpi=100)
        plt.close(fig)
    if layer_density:
        fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(layer_density)), 3.5))
        ax.bar(range(len(layer_density)), list(layer_density.values()))
        ax.set_xticks(range(len(layer_density)), list(layer_density), rotation=70, fontsize=7)
        ax.set_ylabel("density")
        fig.tight_layout()
        fig.savefig(out / rundir.LAYER_DENSITY_PLOT, dpi=100)
        plt.close(fig)
