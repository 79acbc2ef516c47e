"""What several `fedtiny` subcommands share: the exit code of a config error, the run folder, the preflight.

Subcommand modules import this, never `simulations.cli.main`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

from shared import rundir
from shared.config import Config, ConfigError
from shared.units import human_bytes

EXIT_CONFIG = 2  # a configuration or flag error (one line on stderr)
EXIT_RUN_FAILED = 1  # the run itself failed
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT (Ctrl-C; SIGTERM is handled alike)


def with_output_dir(config: Config, suffix: str = "") -> tuple[Config, Path]:
    """`config` with its output_dir resolved (default outputs/<timestamp>-<method><suffix>), and that folder."""
    if config.output_dir:
        out = Path(config.output_dir).expanduser().resolve()
    else:
        out = rundir.default_output_dir(f"{config.method}{suffix}")
    return replace(config, output_dir=str(out)), out


def preflight(config: Config) -> None:
    """Load the data, cut the partition and build the model once here, before any process starts,
    so a bad path or name, a fleet the data cannot fill, or a density below the dense layers fails
    at once with one line (ConfigError, exit code 2)."""
    from shared.data import load_for
    from shared.models import model_for

    check_output_dir(config)
    bundle = load_for(config)
    check_partition(config, bundle.y_train)
    check_dense_budget(config, model_for(config, bundle))


def check_output_dir(config: Config) -> None:
    """The run's output folder must be creatable and writable (it is where the run resumes from)."""
    path = with_output_dir(config)[1]
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as exc:  # e.g. a name too long for the file system
        raise ConfigError(f"config key 'output_dir': {path} cannot be a folder here ({exc.strerror}); choose another output_dir") from None
    if not existing.is_dir():
        raise ConfigError(f"config key 'output_dir': {existing} is a file, so {path} cannot be a folder; choose another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config key 'output_dir': {existing} is not writable by this user; choose another output_dir")


def check_partition(config: Config, labels) -> None:
    """Every client must hold enough examples to train and to hold out (shared.partition.min_client_size)."""
    from shared.partition import MIN_HOLDOUT, MIN_TRAIN, client_sizes, min_client_size

    d, n = config.dataset, config.fl.num_clients
    need = min_client_size(d.holdout)
    short = int((client_sizes(labels, n, d.partition, d.alpha, d.holdout, config.seed) < need).sum())
    if not short:
        return
    fixes = [f"set fl.num_clients to at most {len(labels) // need}"]
    fits = [h for h in (0.3, 0.4, 0.5) if h > d.holdout and min_client_size(h) <= len(labels) // n]
    if fits:
        fixes.append(f"hold out more (dataset.holdout={fits[0]:g} needs {min_client_size(fits[0])})")
    fixes.append("use a larger dataset" + (" (e.g. dataset.name=fashion-mnist, 60,000)" if d.name == "digits" else ""))
    raise ConfigError(
        f"config key 'fl.num_clients': {short} of {n} clients would hold fewer than {need} examples "
        f"({MIN_TRAIN} to train, {MIN_HOLDOUT} held out at dataset.holdout={d.holdout:g}) of the "
        f"{len(labels)} training examples of dataset {d.name!r}; {', '.join(fixes[:-1])} or {fixes[-1]}"
    )


def check_dense_budget(config: Config, model) -> None:
    """The weights kept at `pruning.density` must cover the first layer that `pruning.keep_first_dense` keeps whole."""
    from shared.pruning.params import prunable_names

    if not config.pruning.keep_first_dense or config.method == "fedavg":  # fedavg never prunes
        return
    params = dict(model.named_parameters())
    names = prunable_names(model)
    total = sum(params[name].numel() for name in names)
    kept, first = round(config.pruning.density * total), params[names[0]].numel()
    if first > kept:
        raise ConfigError(
            f"config key 'pruning.density': {config.pruning.density:g} keeps {kept} of the model's {total} prunable "
            f"weights, but pruning.keep_first_dense=true keeps all {first} of {names[0]}; raise pruning.density "
            f"to at least {math.ceil(first / total * 1e4) / 1e4:g} or set pruning.keep_first_dense=false"
        )


def finished(run_dir: Path) -> dict | None:
    """The run's metrics when it finished (a summary with an accuracy), else None."""
    path = run_dir / rundir.METRICS
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if "accuracy" in metrics.get("summary", {}) else None


def status(text: str) -> None:
    """A line on stdout saying what the command is doing now (stderr keeps only errors, one line each)."""
    print(f"fedtiny: {text}", flush=True)


def print_summary(metrics: dict, out: Path, total_seconds: float | None = None) -> None:
    """Where a finished run's results are and what they say, then the one key=value line scripts read:
    wall_seconds is the run itself (metrics.json, the bar's time), total_seconds the whole command,
    Flower's and Ray's start-up and shutdown included."""
    s = metrics["summary"]
    federated = s.get("federated_accuracy")
    dense = s.get("dense_bytes_up", 0) + s.get("dense_bytes_down", 0)
    lines = [
        f"outputs      {out}",
        f"accuracy     {100 * s['accuracy']:.2f}% central test"
        + ("" if federated is None else f", {100 * federated:.2f}% federated (clients' held-out data)"),
        f"density      {s['density']:.4f} of the prunable weights",
        f"bytes        {s['bytes_ratio']:.4f} of dense FedAvg ({human_bytes(s.get('bytes_up', 0) + s.get('bytes_down', 0))}"
        f" against {human_bytes(dense)}, both ways)",
    ]
    if s.get("selected"):
        lines.append(f"policy       {s['selected']} (selected by the pruning policy search)")
    plots = sorted(p.name for p in out.glob("*.png"))
    if plots:
        lines.append(f"plots        {', '.join(plots)}")
    if any(out.glob("events.out.tfevents*")):
        lines.append(f"TensorBoard  tensorboard --logdir {out}")
    total = "" if total_seconds is None else f" total_seconds={total_seconds:.1f}"
    lines.append(
        f"accuracy={s['accuracy']:.4f} density={s['density']:.4f} bytes_ratio={s['bytes_ratio']:.4f} "
        f"wall_seconds={s['wall_seconds']:.1f}{total} outputs={out}"
    )
    print("\n".join(lines), flush=True)


def fail(message: object) -> int:
    """Print `fedtiny: message` on stderr; the exit code of a failed run."""
    print(f"fedtiny: {message}", file=sys.stderr)
    return EXIT_RUN_FAILED
