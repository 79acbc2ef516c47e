"""GPU check (issue 15): the default job on a CUDA GPU against the CPU, and seconds per round of the regime.

1. The default job (`configs/default.yaml`, FedTiny on digits, seed 0) with `device=cuda` and
   4 virtual clients sharing the GPU (`simulation.gpus_per_client=0.25`, 4 CPUs), then the same
   config with `device=cpu`; the two final accuracies must agree within `--tolerance` (GPU
   kernels round differently, so equality is not expected; one digits test image is 0.28 points).
   Then the centralized ceiling (`method=centralized`) of the same config on each device, likewise.
2. The regime config (`configs/fashion-mnist-regime.yaml`) for `--rounds` rounds only, on the GPU
   and on the CPU with the same clients at once (`--clients-at-once`, default 10 = one round's
   clients), policy search off (`fedtiny.search_rounds=0`: its rounds are the same rounds);
   seconds per round are the median over rounds 2.. (round 1 starts the Ray workers).

Prints one JSON object on the last line of stdout and exits 0 when the accuracies agree, 1 when
they do not, 2 (one line) when this machine has no CUDA GPU.

Run (repository root, a venv with torch's CUDA build: docs/gpus-and-clusters.md):

    python -m simulations.gpu_check                       # Fashion-MNIST at /usr/share/datasets/fashion-mnist
    python -m simulations.gpu_check --fashion-mnist DIR   # DIR holds the four *-ubyte.gz files
    python -m simulations.gpu_check --skip-regime         # the default job only (no Fashion-MNIST needed)

Only step 2 needs Fashion-MNIST. On a machine without Debian's dataset-fashion-mnist package,
copy its four .gz files (about 30 MB) into an ignored folder of the checkout first, e.g.
`mkdir -p outputs/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz outputs/fashion-mnist/`,
carry that folder along and pass `--fashion-mnist outputs/fashion-mnist`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REGIME = Path(__file__).resolve().parents[1] / "configs" / "fashion-mnist-regime.yaml"
FASHION_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)


def run(config_file: Path | None, overrides: list[str], out: Path) -> dict:
    """One `fedtiny run` through Flower's simulation (the launcher every run uses); metrics.json."""
    from shared.config import load_config
    from simulations.cli.launch import simulate

    config = load_config(config_file, [*overrides, f"output_dir={out}"])
    started = time.monotonic()
    metrics = simulate(config, out, progress=False, echo=False)
    metrics["wall_seconds"] = time.monotonic() - started
    return metrics


def agreement(gpu: dict, cpu: dict, tolerance: float, *keys: str) -> dict:
    """The GPU and CPU runs' final accuracies, whether they agree within `tolerance`, their wall
    seconds and the summary entries `keys` of each."""
    a_gpu, a_cpu = gpu["summary"]["accuracy"], cpu["summary"]["accuracy"]
    out = {"accuracy_cuda": a_gpu, "accuracy_cpu": a_cpu, "difference": a_gpu - a_cpu, "tolerance": tolerance,
           "agree": abs(a_gpu - a_cpu) <= tolerance}
    for key in keys:
        out[f"{key}_cuda"], out[f"{key}_cpu"] = gpu["summary"][key], cpu["summary"][key]
    return {**out, "wall_seconds_cuda": gpu["wall_seconds"], "wall_seconds_cpu": cpu["wall_seconds"]}


def seconds_per_round(metrics: dict) -> float:
    """Median seconds of the federated rounds after the first (round 1 also starts the Ray workers)."""
    rounds = [r["seconds"] for r in metrics["rounds"] if r["round"] >= 2]
    return statistics.median(rounds) if rounds else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gpu-check", help="parent folder of the runs' output directories")
    parser.add_argument("--tolerance", type=float, default=0.03, help="largest accepted |GPU - CPU| final accuracy")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the regime config timed on each device")
    parser.add_argument("--clients-at-once", type=int, default=10, help="regime clients running at once (CPUs, GPU share)")
    parser.add_argument("--fashion-mnist", default="", help="folder of Fashion-MNIST's four .gz files")
    parser.add_argument("--skip-regime", action="store_true", help="only the default job")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}); run it on a machine with one", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    result: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cpus": os.cpu_count()}

    shared = ["seed=0", "simulation.num_cpus=4"]
    gpu = run(None, [*shared, "device=cuda", "simulation.gpus_per_client=0.25"], out / "default-cuda")
    cpu = run(None, [*shared, "device=cpu"], out / "default-cpu")
    result["default_job"] = {
        "clients_at_once": 4, **agreement(gpu, cpu, args.tolerance, "bytes_ratio"),
        "seconds_per_round_cuda": seconds_per_round(gpu), "seconds_per_round_cpu": seconds_per_round(cpu),
    }
    print(json.dumps({"default_job": result["default_job"]}), file=sys.stderr, flush=True)
    ceiling = {d: run(None, [*shared, "method=centralized", f"device={d}"], out / f"ceiling-{d}") for d in ("cuda", "cpu")}
    result["ceiling"] = agreement(ceiling["cuda"], ceiling["cpu"], args.tolerance, "density")

    folder = Path(args.fashion_mnist or "/usr/share/datasets/fashion-mnist")
    if args.skip_regime:
        result["regime"] = "skipped (--skip-regime)"
    elif not all((folder / f).is_file() for f in FASHION_FILES):
        result["regime"] = f"skipped: Fashion-MNIST's .gz files are not in {folder} (--fashion-mnist DIR)"
    else:
        k = args.clients_at_once
        regime = [f"fl.rounds={args.rounds}", "fedtiny.search_rounds=0", f"dataset.path={folder}", f"simulation.num_cpus={k}"]
        g = run(REGIME, [*regime, "device=cuda", f"simulation.gpus_per_client={1 / k:.4g}"], out / "regime-cuda")
        c = run(REGIME, [*regime, "device=cpu"], out / "regime-cpu")
        s_gpu, s_cpu = seconds_per_round(g), seconds_per_round(c)
        result["regime"] = {
            "rounds": args.rounds, "clients_at_once": k,
            "seconds_per_round_cuda": s_gpu, "seconds_per_round_cpu": s_cpu, "speedup": s_cpu / s_gpu,
            "round_seconds_cuda": [r["seconds"] for r in g["rounds"]],
            "round_seconds_cpu": [r["seconds"] for r in c["rounds"]],
            "accuracy_cuda": g["summary"]["accuracy"], "accuracy_cpu": c["summary"]["accuracy"],
        }
    print(json.dumps(result))
    return 0 if result["default_job"]["agree"] and result["ceiling"]["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
