"""Benchmarks of fedtiny: fleet scale, overhead vs plain Flower, bytes, client memory, Ray cluster.

Run as `python -m simulations.bench NAME [--smoke]`, NAME one of scale, overhead, bytes,
memory, ray-cluster. Each prints progress to stderr and its figures as one JSON object on
the last line of stdout. `--smoke` runs a tiny version (digits, a few clients) for CI;
without it the full sizes of docs/performance.md (Fashion-MNIST).
Runs happen one after another in this process tree, so ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from shared import rundir
from simulations.harness import LineClock, bench_config, probe_cluster, ray_head, run_fedtiny, run_plain
from simulations.monitor import TreeMonitor

BENCHMARKS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {}


def benchmark(name: str):
    def register(fn):
        BENCHMARKS[name] = fn
        return fn

    return register


def note(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@benchmark("scale")
def scale(args: argparse.Namespace, work: Path) -> dict:
    """FedTiny over a large virtual fleet, a few sampled per round: peak memory of the tree, time per round."""
    sizes = args.clients or ([50, 200] if args.smoke else [1000, 10000])
    per_round = 2 if args.smoke else 10
    runs = []
    for n in sizes:
        config = bench_config(args.smoke, [
            f"fl.num_clients={n}", f"fl.clients_per_round={per_round}", f"fedtiny.search_clients={per_round}",
            f"fl.rounds={2 if args.smoke else 3}", "simulation.virtual_partitions=true",
            "dataset.holdout=0.3",  # 6 images a client at 10,000: 2 held out (BN recalibration needs 2), 4 to train
        ])
        out = work / f"scale-{n}"
        note(f"scale: {n} clients, {per_round} per round, {config.fl.rounds} rounds -> {out}")
        start = time.monotonic()
        with TreeMonitor(marker=str(out)) as mon, LineClock(out / rundir.RUN_LOG, ["output directory", "partitions to virtual clients"]) as clock:
            metrics = run_fedtiny(config, out)
        rounds = [r for r in metrics["rounds"] if r["round"] >= 1]
        registered = clock.seen.get("partitions to virtual clients")
        began = clock.seen.get("output directory")
        runs.append({
            "clients": n,
            "peak_rss_mb": round(mon.result.peak_rss_mb, 1),
            "peak_pss_mb": round(mon.result.peak_pss_mb, 1),
            "max_processes": mon.result.max_processes,
            "seconds_per_round": round(_median([r["seconds"] for r in rounds]), 3),
            "search_seconds": round(metrics["rounds"][0]["seconds"], 3),
            "register_seconds": round(registered - began, 2) if registered and began else None,
            "wall_seconds": round(time.monotonic() - start, 1),
            "accuracy": metrics["summary"]["accuracy"],
        })
        note(f"scale: {runs[-1]}")
    result = {"scale": runs}
    if len(runs) >= 2:
        result["rss_growth"] = round(runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3)
        result["pss_growth"] = round(runs[-1]["peak_pss_mb"] / runs[0]["peak_pss_mb"], 3)
    return result


@benchmark("overhead")
def overhead(args: argparse.Namespace, work: Path) -> dict:
    """Median round time of FedTiny's progressive phase vs Flower's FedAvg on the same model, data and clients.

    Runs in ABBA order (plain, FedTiny, FedTiny, plain; once each with --smoke) so that a load that
    drifts during the benchmark weighs on both sides alike; round 1 (Ray workers starting) is left
    out of both.
    """
    common = ["fedtiny.end_fraction=1.0"]  # every training round is in the progressive phase
    if args.smoke:
        common += ["fl.rounds=3", "fedtiny.adjust_interval=2"]
    else:
        common += ["fl.rounds=8", "fl.num_clients=50", "fl.clients_per_round=10", "fedtiny.adjust_interval=2"]
    config = bench_config(args.smoke, common)
    order = ["plain", "fedtiny"] if args.smoke else ["plain", "fedtiny", "fedtiny", "plain"]
    plain_s: list[float] = []
    rounds: list[dict] = []
    accuracy: dict[str, float] = {}
    for i, kind in enumerate(order):
        note(f"overhead: {kind} ({i + 1}/{len(order)}), {config.fl.rounds} rounds")
        if kind == "plain":
            plain = run_plain(bench_config(args.smoke, common), work / f"plain-{i}")
            plain_s += plain["round_seconds"][1:]
            accuracy["fedavg"] = plain["accuracy"][-1]
        else:
            metrics = run_fedtiny(bench_config(args.smoke, common), work / f"fedtiny-{i}")
            rounds += [r for r in metrics["rounds"] if r["round"] >= 2]
            accuracy["fedtiny"] = metrics["summary"]["accuracy"]
    fedavg_s = _median(plain_s)
    fedtiny_s = _median([r["seconds"] for r in rounds])
    return {
        "ratio": round(fedtiny_s / fedavg_s, 3),
        "fedavg_round_s": round(fedavg_s, 3),
        "fedtiny_round_s": round(fedtiny_s, 3),
        "fedtiny_adjust_round_s": round(_median([r["seconds"] for r in rounds if r["phase"] == "adjust"]), 3),
        "fedtiny_train_round_s": round(_median([r["seconds"] for r in rounds if r["phase"] == "train"]), 3),
        "order": order,
        "rounds": config.fl.rounds,
        "clients_per_round": config.fl.clients_per_round,
        "fedavg_accuracy": accuracy["fedavg"],
        "fedtiny_accuracy": accuracy["fedtiny"],
    }


@benchmark("bytes")
def bytes_(args: argparse.Namespace, work: Path) -> dict:
    """Bytes both ways of FedTiny at densities 0.05 and 0.01 vs dense FedAvg, next to the information bound.

    In-process (real ClientApp handlers, no Ray): bytes do not depend on the transport, and
    every payload is kept for the bound.
    """
    from simulations.inprocess import run_in_process
    from shared import codec
    from simulations.wire_bound import blob_bound

    overrides = ["fl.rounds=3"] if args.smoke else []
    fedavg, _ = run_in_process(bench_config(args.smoke, overrides + ["method=fedavg"], args.config), work / "fedavg")
    fedavg_bytes = fedavg["summary"]["bytes_up"] + fedavg["summary"]["bytes_down"]  # a real dense run, as a check
    rows = []
    for d in (0.05, 0.01):
        note(f"bytes: FedTiny at density {d}")
        metrics, grid = run_in_process(
            bench_config(args.smoke, overrides + [f"pruning.density={d}"], args.config), work / f"fedtiny-{d}"
        )
        s = metrics["summary"]
        dense = s["dense_bytes_up"] + s["dense_bytes_down"]
        sent = s["bytes_up"] + s["bytes_down"]
        bound = sum(blob_bound(b) for _, b in grid.down + grid.up)
        raw = sum(len(codec.inflate(b)) for _, b in grid.down + grid.up)  # the same payloads without deflate
        by_kind: dict[str, int] = {}
        for kind, b in grid.down + grid.up:
            by_kind[kind] = by_kind.get(kind, 0) + len(b)
        rows.append({
            "density": d,
            "ratio": round(sent / dense, 5),
            "bound": round(bound / dense, 5),
            "raw_ratio": round(raw / dense, 5),
            "ratio_vs_fedavg_run": round(sent / fedavg_bytes, 5),
            "bytes": sent,
            "dense_bytes": dense,
            "bytes_by_message": by_kind,
            "accuracy": s["accuracy"],
        })
        note(f"bytes: {rows[-1]}")
    return {"bytes": rows, "fedavg_bytes": fedavg_bytes, "fedavg_accuracy": fedavg["summary"]["accuracy"]}


@benchmark("memory")
def memory(args: argparse.Namespace, work: Path) -> dict:
    """Peak memory of one client's training round at density 0.01 vs dense, each in its own process."""
    models = [("cnn", "1,28,28")] if args.smoke else [("cnn", "1,28,28"), ("resnet18", "3,32,32")]
    batches = "2" if args.smoke else "10"
    rows = []
    for model, shape in models:
        for d in (1.0, 0.01):
            cmd = [sys.executable, "-m", "simulations.client_memory", "--model", model, "--shape", shape,
                   "--density", str(d), "--batches", batches, "--batch-size", "32" if args.smoke else "64"]
            note(f"memory: {model} density {d}")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            note(f"memory: {rows[-1]}")
    return {"memory": rows}


@benchmark("ray-cluster")
def ray_cluster(args: argparse.Namespace, work: Path) -> dict:
    """A tiny job joins a running `ray start --head` cluster through `simulation.ray_address`."""
    with ray_head(num_cpus=2) as (address, _, temp):
        before = probe_cluster(address)
        config = bench_config(True, ["fl.rounds=2", f"simulation.ray_address={address}"])
        note(f"ray-cluster: tiny job on the Ray cluster at {address}")
        metrics = run_fedtiny(config, work / "ray-cluster")
        after = probe_cluster(address)
        sessions = sorted(p.name for p in (temp / "session_latest").parent.glob("session_2*"))
    return {
        "address": address,
        "jobs_before": before["jobs"],
        "jobs_after": after["jobs"],
        "cluster_cpus": after["cpus"],
        "ray_sessions_in_cluster_dir": len(sessions),
        "jobs_run": after["jobs"] - before["jobs"] - 1,  # the first probe is a job too
        "ran_on_cluster": after["jobs"] - before["jobs"] - 1 >= 1,
        "accuracy": metrics["summary"]["accuracy"],
        "rounds": len(metrics["rounds"]) - 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--clients", type=int, nargs="*", help="scale only: fleet sizes to run (default 1000 10000)")
    parser.add_argument("--work-dir", type=Path, help="where runs write their outputs (default: a temp dir)")
    parser.add_argument("--config", type=Path, help="bytes only: the job's YAML (default configs/fashion-mnist.yaml)")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix=f"bench-{args.name}-"))
    work.mkdir(parents=True, exist_ok=True)
    note(f"{args.name}: outputs in {work}")
    result = BENCHMARKS[args.name](args, work.resolve())
    result = {"benchmark": args.name, "smoke": args.smoke, **result}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
