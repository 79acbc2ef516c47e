"""`fedtiny` command line: the parser, and errors mapped to exit codes.

Each subcommand lives in its own module with `add_commands(subparsers)`; only this module
imports them, and only the module of the subcommand being run (simulations.cli.commands lists
them), so `fedtiny --help` and `--version` answer without importing torch or Flower.
Configuration errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from simulations.cli.commands import COMMANDS


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the subcommand named first in `argv` gets its full arguments, the others only their help line."""
    ap = argparse.ArgumentParser(
        prog="fedtiny", description="Federated pruning towards tiny models (FedTiny) on Flower.",
        epilog="`fedtiny COMMAND --help` describes a command; `fedtiny config` prints every setting of a run.",
    )
    ap.add_argument("--version", action="version", version=f"fedtiny {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv or [] if not a.startswith("-")), None)
    loaded = {COMMANDS[wanted][0]} if wanted in COMMANDS else set()
    for module in loaded:
        importlib.import_module(module).add_commands(sub)
    for name, (module, help_text) in COMMANDS.items():
        if module not in loaded:
            sub.add_parser(name, help=help_text)
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedtiny")
    except PackageNotFoundError:
        return "(not installed)"


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments, with key=value overrides allowed anywhere among the flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(argv)
    args, extra = ap.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        ap.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv  # the command as typed, for a command that says how to continue it
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (e.g. from `timeout`) stops a run like Ctrl-C: everything it started stops


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from shared.config import ConfigError
    from simulations.cli.common import EXIT_CONFIG, EXIT_INTERRUPTED

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fedtiny: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedtiny: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # before or after the work a command stops cleanly on its own
        print("\nfedtiny: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
