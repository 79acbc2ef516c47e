"""`fedtiny run`: one federated job in Flower's simulation engine, new or resumed from its last checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shared import rundir
from shared.config import Config, ConfigError, load_config, to_flat, to_yaml
from shared.saved_config import load_saved
from simulations.cli.common import fail, preflight, print_summary, with_output_dir

EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


def _run(args: argparse.Namespace) -> int:
    from simulations.cli.launch import RunFailed, simulate

    if args.resume:
        config = resume_config(Path(args.resume), args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    config, out = with_output_dir(config)
    preflight(config)
    started = time.monotonic()
    try:
        metrics = simulate(config, out, progress=not args.no_progress)
    except RunFailed as exc:
        return fail(exc)
    except KeyboardInterrupt:
        print(f"\nfedtiny: interrupted; continue from the last checkpoint with: fedtiny run --resume {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_summary(metrics, out, time.monotonic() - started)
    return 0


# Overrides a resumed run may take: how it runs, not what it computes (recorded in its config.yaml).
OPERATIONAL = ("output_dir", "resume", "device", "tracking", "fl.round_timeout", "fl.min_replies", "fl.eval_every")
OPERATIONAL_SECTIONS = ("simulation.",)  # processes, CPUs, GPUs, Ray cluster, drills


def resume_config(out: Path, overrides: list[str]) -> Config:
    """The saved config of a run, set to continue from its last checkpoint; an override that would change
    what the run computes (method, density, model, data, seed, rounds, schedule, ...) is refused in one line.

    The folder's own `trusted` list is ignored (`shared.saved_config`): packages are trusted only by a
    `trusted=...` override on this command line."""
    from server.checkpoint import exists

    out = out.expanduser().resolve()
    if not (out / rundir.CONFIG).exists() or not exists(out):
        raise ConfigError(
            f"{out} has no {rundir.CONFIG} and {rundir.CHECKPOINT} to resume from; pass a run's output directory"
        )
    trust = [o for o in overrides if o.partition("=")[0].strip() == "trusted"]
    saved = to_flat(load_saved(out, [*trust, "resume=true", f"output_dir={out}"]))
    config = load_saved(out, [*overrides, "resume=true", f"output_dir={out}"])
    for key, value in to_flat(config).items():
        if value != saved.get(key) and key not in OPERATIONAL and not key.startswith(OPERATIONAL_SECTIONS):
            raise ConfigError(
                f"--resume cannot change {key} ({saved.get(key)!r} -> {value!r}): the checkpoint was computed with the "
                f"first; start a new run (without --resume) for another {key}"
            )
    return config


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `run` and `config` subcommands to the `fedtiny` parser."""
    run = subparsers.add_parser("run", help="run a federated job in Flower's simulation engine")
    run.add_argument("--config", help="YAML file merged onto configs/default.yaml")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.add_argument("--resume", metavar="OUTPUT_DIR", help="continue a crashed run from its last checkpoint")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pruning.density=0.01")
    run.set_defaults(func=_run)
    cfg = subparsers.add_parser("config", help="print the resolved, validated config of a run (YAML)")
    cfg.add_argument("--config", help="YAML file merged onto configs/default.yaml")
    cfg.add_argument("overrides", nargs="*", help="key=value overrides")
    cfg.set_defaults(func=_config)


def _config(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    preflight(config)  # the same checks as a run: data, partition, model, density
    print(to_yaml(config), end="")
    return 0
