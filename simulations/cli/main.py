"""`fedtiny` command line: the parser, and errors mapped to exit codes.

Each subcommand lives in its own module with `add_commands(subparsers)`; only this module
imports them. Configuration errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import signal
import sys

from shared.config import ConfigError
from simulations.cli import compare, deploy, export, fleet_gate, run
from simulations.cli.common import EXIT_CONFIG


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedtiny", description="Federated pruning towards tiny models (FedTiny) on Flower.")
    ap.add_argument("--version", action="version", version=f"fedtiny {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    for module in (run, export, deploy, compare, fleet_gate):
        module.add_commands(sub)
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedtiny")
    except PackageNotFoundError:
        return "(not installed)"


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments, with key=value overrides allowed anywhere among the flags."""
    ap = parser()
    args, extra = ap.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        ap.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (e.g. from `timeout`) stops a run like Ctrl-C: everything it started stops


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fedtiny: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedtiny: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        signal.signal(signal.SIGTERM, previous)
