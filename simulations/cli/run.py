"""`fedtiny run`: one federated job in Flower's simulation engine, new or resumed from its last checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shared import rundir
from shared.config import Config, ConfigError, load_config, to_flat, to_yaml
from shared.saved_config import load_saved
from simulations.cli.commands import METHODS, help_for
from simulations.cli.common import EXIT_INTERRUPTED, fail, finished, preflight, print_summary, status, with_output_dir


def _run(args: argparse.Namespace) -> int:
    done = finished(Path(args.resume).expanduser().resolve()) if args.resume else None
    if done is not None:
        status(f"{args.resume} has finished (accuracy={done['summary']['accuracy']:.4f}); nothing to resume, "
               "nothing changed")
        return 0
    status("checking the config, the data and the model")
    from simulations.cli.launch import RunFailed, simulate

    if args.resume:
        config = resume_config(Path(args.resume), args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    config, out = with_output_dir(config)
    preflight(config)
    status(f"{'resuming' if args.resume else 'starting'} {config.method} in {out}; Flower and Ray take a while "
           "to start before the first round")
    started = time.monotonic()
    try:
        metrics = simulate(config, out, progress=not args.no_progress)
    except RunFailed as exc:
        return fail(exc)
    except KeyboardInterrupt:
        if (out / rundir.CHECKPOINT).exists():
            line = f"interrupted; continue from the last checkpoint with: fedtiny run --resume {out}"
        else:
            line = "interrupted before the first round's checkpoint; nothing to resume, start the run again"
        print(f"\nfedtiny: {line}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_summary(metrics, out, time.monotonic() - started)
    return 0


RUN_DESCRIPTION = f"""Run one federated job: configs/default.yaml, then --config FILE, then key=value overrides.

methods (method=NAME): {", ".join(METHODS)},
  or package.module:Class from a trusted package
main keys: method, seed, output_dir, pruning.density, fl.rounds, fl.num_clients, fl.clients_per_round,
  fl.local_epochs, fl.lr, dataset.name (digits, fashion-mnist, cifar10), model.name (cnn, cnn-pool,
  vgg11, resnet18), device (auto, cpu, cuda), tracking (tensorboard, none), and each method's own
  section (fedtiny.*, snip.*, ...)
every key with its value: fedtiny config [--config FILE] [key=value ...]; reference: docs/configuration.md
example: fedtiny run --config configs/tiny.yaml pruning.density=0.01 fl.rounds=5"""


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
    run = subparsers.add_parser("run", help=help_for("run"), description=RUN_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", help="YAML file merged onto configs/default.yaml")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.add_argument("--resume", metavar="OUTPUT_DIR", help="continue a crashed run from its last checkpoint")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pruning.density=0.01")
    run.set_defaults(func=_run)
    cfg = subparsers.add_parser("config", help=help_for("config"))
    cfg.add_argument("--config", help="YAML file merged onto configs/default.yaml")
    cfg.add_argument("--reference", action="store_true",
                     help="print the Markdown reference of every key instead (docs/configuration.md)")
    cfg.add_argument("overrides", nargs="*", help="key=value overrides")
    cfg.set_defaults(func=_config)


def _config(args: argparse.Namespace) -> int:
    if args.reference:
        from simulations.cli.reference import reference

        print(reference(), end="")
        return 0
    config = load_config(args.config, args.overrides)
    preflight(config)  # the same checks as a run: data, partition, model, density
    print(to_yaml(config), end="")
    return 0
