"""What several `fedtiny` subcommands share: the exit code of a config error, the run folder, the preflight.

Subcommand modules import this, never `simulations.cli.main`.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from shared.config import Config
from shared.rundir import default_output_dir

EXIT_CONFIG = 2  # a configuration or flag error (one line on stderr)
EXIT_RUN_FAILED = 1  # the run itself failed


def with_output_dir(config: Config, suffix: str = "") -> tuple[Config, Path]:
    """`config` with its output_dir resolved (default outputs/<timestamp>-<method><suffix>), and that folder."""
    if config.output_dir:
        out = Path(config.output_dir).expanduser().resolve()
    else:
        out = default_output_dir(f"{config.method}{suffix}")
    return replace(config, output_dir=str(out)), out


def preflight(config: Config) -> None:
    """Load the data and build the model once here, so a bad path or name fails fast with one line."""
    from shared.data import load_for
    from shared.models import build_model

    bundle = load_for(config)
    build_model(config.model.name, bundle.num_classes, bundle.input_shape, config.model.width, config.seed)


def print_summary(metrics: dict, out: Path) -> None:
    """The one line a finished run prints."""
    s = metrics["summary"]
    print(
        f"accuracy={s['accuracy']:.4f} density={s['density']:.4f} bytes_ratio={s['bytes_ratio']:.4f} "
        f"wall_seconds={s['wall_seconds']:.1f} outputs={out}"
    )


def fail(message: object) -> int:
    """Print `fedtiny: message` on stderr; the exit code of a failed run."""
    print(f"fedtiny: {message}", file=sys.stderr)
    return EXIT_RUN_FAILED
