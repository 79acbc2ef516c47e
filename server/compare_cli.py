"""`fedtiny compare`: run methods x densities x seeds in simulation and write the results table.

Thin wiring: the work is in `server.compare`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.config import ConfigError, load_config


def _list(text: str, cast, flag: str) -> list:
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        values = [cast(s) for s in items]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of {cast.__name__} values") from None
    if not values:
        raise ConfigError(f"{flag} is empty; give a comma-separated list")
    return values


def _compare(args: argparse.Namespace) -> int:
    from server import compare
    from server.cli import preflight
    from server.launch import simulate

    methods = _list(args.methods, str, "--methods")
    densities = _list(args.densities, float, "--densities")
    seeds = _list(args.seeds, int, "--seeds")
    base = load_config(args.config, args.overrides)
    out = Path(base.output_dir or "outputs/compare").expanduser().resolve()
    overrides = [o for o in args.overrides if not o.startswith("output_dir=")]
    cells = compare.grid(methods, densities, seeds)
    preflight(base)
    results, failures = compare.run_grid(
        cells, out, args.config, overrides, lambda config, run_dir: simulate(config, run_dir, progress=False, echo=False)
    )
    if results:
        for path in compare.write_outputs(results, out):
            print(f"wrote {path}")
    for line in failures:
        print(f"fedtiny: run failed: {line}", file=sys.stderr)
    return 1 if failures else 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand to the `fedtiny` parser."""
    cmp = subparsers.add_parser("compare", help="run methods x densities x seeds and write a comparison table and plots")
    cmp.add_argument("--methods", required=True,
                     help="comma-separated: fedtiny,fedavg,snip,synflow,prunefl,feddst,imp,fedtiny-noabns,fedtiny-noprogressive")
    cmp.add_argument("--densities", default="0.01,0.05", help="comma-separated target densities (fedavg runs dense once per seed)")
    cmp.add_argument("--seeds", default="0", help="comma-separated seeds")
    cmp.add_argument("--config", help="YAML file merged onto configs/default.yaml")
    cmp.add_argument("overrides", nargs="*", help="key=value overrides for every run; output_dir= is the grid's folder")
    cmp.set_defaults(func=_compare)
