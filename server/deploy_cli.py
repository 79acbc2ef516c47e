"""`fedtiny deploy-local`: the same job on a real Flower deployment on localhost (TLS, authenticated SuperNodes)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from shared.config import load_config


def add_commands(subparsers) -> None:
    """Add `deploy-local` to the `fedtiny` command line."""
    p = subparsers.add_parser(
        "deploy-local",
        help="run a federated job on a local SuperLink and N SuperNodes with TLS and node authentication",
    )
    p.add_argument("--nodes", type=int, required=True, help="number of SuperNodes; sets fl.num_clients (one partition each)")
    p.add_argument("--config", help="YAML file merged onto configs/default.yaml")
    p.add_argument("--port", type=int, help="SuperLink port on 127.0.0.1 (default: a free one)")
    p.add_argument("--certs", help="folder with ca.crt, server.crt, server.key to use instead of fresh ones")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. fl.rounds=5")
    p.set_defaults(func=_deploy_local)


def _deploy_local(args: argparse.Namespace) -> int:
    from server.cli import preflight
    from server.deploy import deploy_local
    from server.launch import RunFailed

    config = load_config(args.config, [f"fl.num_clients={args.nodes}", *args.overrides])
    out = Path(config.output_dir) if config.output_dir else Path("outputs") / f"{datetime.now():%Y%m%d-%H%M%S}-{config.method}-deploy"
    out = out.expanduser().resolve()
    config = replace(config, output_dir=str(out))
    preflight(config)
    certs = Path(args.certs) if args.certs else None
    try:
        metrics = deploy_local(config, out, args.nodes, args.port, certs, progress=not args.no_progress)
    except RunFailed as exc:
        print(f"fedtiny: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedtiny: interrupted; every SuperLink and SuperNode process was stopped", file=sys.stderr)
        return 130
    s = metrics["summary"]
    print(
        f"accuracy={s['accuracy']:.4f} density={s['density']:.4f} bytes_ratio={s['bytes_ratio']:.4f} "
        f"wall_seconds={s['wall_seconds']:.1f} outputs={out}"
    )
    return 0
