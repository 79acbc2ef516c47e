"""Score finished runs on the union of every client's held-out split, for tuning without the test set.

Hyperparameters are chosen on the clients' held-out data, never on the test set. A run's own federated evaluation samples `fl.clients_per_round`
clients (about 1,900 held-out images in the regime config: a standard error near 0.8 points), too
noisy to rank settings that differ by a point. This scores a run's final model on every client's
held-out split (`shared.partition.client_data`, the very slices the clients hold out; 12,000
images for Fashion-MNIST with `dataset.holdout=0.2`), which is what a federated evaluation over the
whole fleet returns, sample-weighted. The test split is never read for the score.

    python -m simulations.heldout RUN_DIR [RUN_DIR ...]

Prints one JSON object per run: held-out accuracy and loss, examples, and the run's method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from shared.config import ConfigError
from shared.data import batches, load_for
from shared.export.spec import load_run
from shared.partition import ClientData, every_client_data
from shared.saved_config import load_saved
from shared.training import evaluate


def heldout_of(parts: list[ClientData], ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the held-out splits of clients `ids`, concatenated in that order."""
    chosen = [parts[i] for i in ids]
    return np.concatenate([c.x_holdout for c in chosen]), np.concatenate([c.y_holdout for c in chosen])


def heldout_union(config) -> tuple[object, np.ndarray, np.ndarray]:
    """(bundle, images, labels) of every client's held-out split under `config`'s partition."""
    bundle = load_for(config)
    parts = every_client_data(bundle, config)
    return bundle, *heldout_of(parts, range(len(parts)))


def score(run_dir: Path) -> dict:
    """The final model of `run_dir` on the union of its clients' held-out splits."""
    config = load_saved(run_dir)
    model, _, _ = load_run(run_dir)
    bundle, x, y = heldout_union(config)
    result = evaluate(model, batches(bundle, x, y, 512, False, 0))
    return {"run": run_dir.name, "method": config.method, "heldout_accuracy": result.accuracy,
            "heldout_loss": result.loss, "examples": int(len(y))}


def print_each(prog: str, runs: list[Path], measure: Callable[[Path], dict]) -> int:
    """Print `measure(run)` as one JSON line per run; the first unreadable run gets one line on
    stderr naming it and the exit code 2."""
    for run in runs:
        try:
            print(json.dumps(measure(run)), flush=True)
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            print(f"{prog}: {run}: {exc}", file=sys.stderr)
            return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output directories of finished runs")
    return print_each("heldout", parser.parse_args(argv).runs, score)


if __name__ == "__main__":
    sys.exit(main())
