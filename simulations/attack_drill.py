"""The attack drill: the default job honest, then with 1 client in 10 malicious, one attack kind per run.

Each row reproduces with one command, e.g. `fedtiny run simulation.attack=huge simulation.attack_fraction=0.1`
(`client.attacks` lists the kinds). Here every run goes through the real ServerApp and ClientApp in
this process (`simulations.inprocess`, no Ray: the same messages and results, one core), and the
figures print as JSON lines, then as a Markdown table:

    python -m simulations.attack_drill [--kinds huge,topk] [--method fedtiny] [key=value ...]

FedDST's mask-change attack needs `--method feddst` (FedTiny never sends mask changes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from shared.config import ATTACKS, load_config
from simulations.inprocess import run_in_process

FRACTION = 0.1


def drill(kind: str, overrides: list[str]) -> dict:
    """One run of the default job with `kind` (or "none": honest); its accuracy and what the server rejected."""
    attack = [] if kind == "none" else [f"simulation.attack={kind}", f"simulation.attack_fraction={FRACTION}"]
    with tempfile.TemporaryDirectory() as out:
        config = load_config(None, ["tracking=none", *overrides, *attack, f"output_dir={out}"])
        start = time.monotonic()
        try:
            metrics, _ = run_in_process(config, Path(out))
        except Exception as exc:  # a crashed run is a row of the table, not the end of the drill
            return {"attack": kind, "completed": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
    s = metrics["summary"]
    return {
        "attack": kind, "completed": True, "accuracy": s["accuracy"], "federated_accuracy": s.get("federated_accuracy"),
        "rejected": s.get("rejected_updates"), "selected": s.get("selected"), "seconds": round(time.monotonic() - start, 1),
    }


def table(rows: list[dict]) -> str:
    honest = next((r for r in rows if r["attack"] == "none"), None)
    lines = ["| attack (1 client in 10) | completed | accuracy | vs honest | federated accuracy | rejected replies |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if not r["completed"]:
            lines.append(f"| {r['attack']} | no ({r['error']}) | | | | |")
            continue
        gap = f"{100 * (r['accuracy'] - honest['accuracy']):+.2f}" if honest else ""
        lines.append(f"| {r['attack']} | yes | {100 * r['accuracy']:.2f} % | {gap} | "
                     f"{100 * r['federated_accuracy']:.2f} % | {r['rejected']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(k for k in ATTACKS if k != "feddst"),
                        help="comma-separated attack kinds; none is the honest run")
    parser.add_argument("--method", default="fedtiny")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        rows.append(drill(kind, [f"method={args.method}", *args.overrides]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
