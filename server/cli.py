"""`fedtiny` command line: run a federated job in simulation (more subcommands as they land).

Configuration errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from server import compare_cli, deploy_cli, export_cli
from shared.config import Config, ConfigError, load_config

EXIT_CONFIG = 2


def _run(args: argparse.Namespace) -> int:
    from server.launch import RunFailed, simulate

    if args.resume:
        config = resume_config(Path(args.resume), args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    out = Path(config.output_dir) if config.output_dir else Path("outputs") / f"{datetime.now():%Y%m%d-%H%M%S}-{config.method}"
    out = out.expanduser().resolve()
    config = replace(config, output_dir=str(out))
    preflight(config)
    try:
        metrics = simulate(config, out, progress=not args.no_progress)
    except RunFailed as exc:
        print(f"fedtiny: {exc}", file=sys.stderr)
        return 1
    s = metrics["summary"]
    print(
        f"accuracy={s['accuracy']:.4f} density={s['density']:.4f} bytes_ratio={s['bytes_ratio']:.4f} "
        f"wall_seconds={s['wall_seconds']:.1f} outputs={out}"
    )
    return 0


def resume_config(out: Path, overrides: list[str]) -> Config:
    """The saved config of a run, set to continue from its last checkpoint."""
    from server.checkpoint import exists

    out = out.expanduser().resolve()
    if not (out / "config.yaml").exists() or not exists(out):
        raise ConfigError(f"{out} has no config.yaml and checkpoint.json to resume from; pass a run's output directory")
    return load_config(out / "config.yaml", [*overrides, "resume=true", f"output_dir={out}"])


def preflight(config) -> None:
    """Load the data and build the model once here, so a bad path or name fails fast with one line."""
    from shared.data import load_dataset
    from shared.models import build_model

    d = config.dataset
    bundle = load_dataset(d.name, d.path, config.seed, d.test_fraction)
    build_model(config.model.name, bundle.num_classes, bundle.input_shape, config.model.width, config.seed)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedtiny", description="Federated pruning towards tiny models (FedTiny) on Flower.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated job in Flower's simulation engine")
    run.add_argument("--config", help="YAML file merged onto configs/default.yaml")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.add_argument("--resume", metavar="OUTPUT_DIR", help="continue a crashed run from its last checkpoint")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pruning.density=0.01")
    run.set_defaults(func=_run)
    export_cli.add_commands(sub)
    deploy_cli.add_commands(sub)
    compare_cli.add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fedtiny: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedtiny: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
