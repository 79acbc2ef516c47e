"""The attack drill: the default job honest, then with malicious clients, one attack kind per run.

Two settings (`--clients`): 10, the default job (20 clients, 10 a round) with 1 client in 10
malicious; 3, the same job with 3 clients, all in every round, 1 of them malicious. Each row
reproduces with one command, e.g. `fedtiny run simulation.attack=huge simulation.attack_fraction=0.1`
(`client.attacks` lists the kinds). Here every run goes through the real ServerApp and ClientApp in
this process (`simulations.inprocess`, no Ray: the same messages and results, one core), and the
figures print as JSON lines, then as a Markdown table:

    python -m simulations.attack_drill [--kinds huge,topk] [--clients 3] [--seeds 0,1,2] [--method fedtiny] [key=value ...]

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

# --clients -> (the overrides of the default job, the attackers' fraction of the partitions)
SETTINGS = {
    10: ([], 0.1),  # 2 of 20 partitions: about 1 in each round's 10
    3: (["fl.num_clients=3", "fl.clients_per_round=3"], 0.3),  # ceil(0.3 x 3) = 1 of 3
}


def drill(kind: str, overrides: list[str], fraction: float = 0.1) -> dict:
    """One run of the default job with `kind` (or "none": honest); its accuracy and what the server rejected."""
    attack = [] if kind == "none" else [f"simulation.attack={kind}", f"simulation.attack_fraction={fraction}"]
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


def table(rows: list[dict], clients: int = 10) -> str:
    honest = {r["seed"]: r for r in rows if r["attack"] == "none" and r["completed"]}
    who = "1 client in 10" if clients == 10 else f"1 client of {clients}"
    lines = [f"| attack ({who}) | seed | completed | accuracy | vs honest | federated accuracy | rejected replies |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if not r["completed"]:
            lines.append(f"| {r['attack']} | {r['seed']} | no ({r['error']}) | | | | |")
            continue
        base = honest.get(r["seed"])
        gap = f"{100 * (r['accuracy'] - base['accuracy']):+.2f}" if base else ""
        lines.append(f"| {r['attack']} | {r['seed']} | yes | {100 * r['accuracy']:.2f} % | {gap} | "
                     f"{100 * r['federated_accuracy']:.2f} % | {r['rejected']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(k for k in ATTACKS if k != "feddst"),
                        help="comma-separated attack kinds; none is the honest run")
    parser.add_argument("--method", default="fedtiny")
    parser.add_argument("--clients", type=int, choices=sorted(SETTINGS), default=10,
                        help="10: the default job, 1 attacker in 10; 3: 3 clients, 1 attacker")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    setting, fraction = SETTINGS[args.clients]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for kind in args.kinds.split(","):
            row = drill(kind, [f"method={args.method}", *setting, f"seed={seed}", *args.overrides], fraction)
            rows.append({"seed": seed, **row})
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows, args.clients))


if __name__ == "__main__":
    main()
