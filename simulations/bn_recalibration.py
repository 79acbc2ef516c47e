"""How much would pooled BN recalibration move a finished run? A diagnostic, not a tuning tool.

FedTiny's `fedtiny.final_bn_clients` replaces the final model's averaged BN statistics with the
exact pool of sampled clients' recalibrations (ABNS steps 2-3). This replays that offline on a
finished run: `--draws` times, `--clients` clients are sampled, each recalibrates on its held-out
split, the statistics are pooled, and the model is scored on the test split, on every client's
held-out split and on the held-out splits of the clients not sampled. It
reads the test split, so settings must not be chosen by it (use `simulations.heldout`).

    python -m simulations.bn_recalibration RUN_DIR [RUN_DIR ...] [--clients 10] [--draws 3]

Prints one JSON object per run: accuracies (%) as the run ended and per draw.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from shared.batchnorm import load_stats, pool_stats, recalibrate
from shared.data import batches, load_for
from shared.export.spec import load_run
from shared.partition import every_client_data
from shared.saved_config import load_saved
from shared.training import evaluate
from simulations.heldout import heldout_of, print_each


def _accuracy(model, bundle, x, y) -> float:
    return round(100 * evaluate(model, batches(bundle, x, y, 512, False, 0)).accuracy, 2)


def _scores(model, bundle, heldout: tuple, unsampled: tuple | None) -> dict:
    """Test accuracy (%), held-out accuracy of every client, and of the unsampled clients when given."""
    scores = {"test": _accuracy(model, bundle, bundle.x_test, bundle.y_test), "heldout": _accuracy(model, bundle, *heldout)}
    if unsampled is not None:
        scores["heldout_unsampled"] = _accuracy(model, bundle, *unsampled)
    return scores


def replay(run_dir: Path, clients: int, draws: int, seed: int = 0) -> dict:
    """Accuracies of `run_dir`'s final model as it ended and after each draw's pooled recalibration."""
    config = load_saved(run_dir)
    model, _, _ = load_run(run_dir)
    ended = {k: v.clone() for k, v in model.state_dict().items()}
    bundle = load_for(config)
    parts = every_client_data(bundle, config)
    everyone = heldout_of(parts, range(len(parts)))
    out = {"run": run_dir.name, "as_ended": _scores(model, bundle, everyone, None), "draws": []}
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        sampled = set(rng.choice(len(parts), min(clients, len(parts)), replace=False).tolist())
        stats = []
        for i in sorted(sampled):
            model.load_state_dict(ended)
            stats.append(recalibrate(model, batches(bundle, parts[i].x_holdout, parts[i].y_holdout, 64, False, 0)))
        load_stats(model, pool_stats(stats))
        rest = [i for i in range(len(parts)) if i not in sampled]
        out["draws"].append(_scores(model, bundle, everyone, heldout_of(parts, rest) if rest else None))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output directories of finished runs")
    parser.add_argument("--clients", type=int, default=10, help="clients sampled per draw")
    parser.add_argument("--draws", type=int, default=3, help="independent draws of clients")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.draws < 1:
        print("bn_recalibration: --clients and --draws must be >= 1", file=sys.stderr)
        return 2
    return print_each("bn_recalibration", args.runs, lambda run: replay(run, args.clients, args.draws))


if __name__ == "__main__":
    sys.exit(main())
