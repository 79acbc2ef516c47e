"""The files of a run's output directory, named in one place.

Every module that writes or reads a run's outputs (the ServerApp, the launcher, compare,
export, resume) takes the names from here.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

CONFIG = "config.yaml"  # the resolved config of the run
METRICS = "metrics.json"  # per-round records and the summary
METRICS_CSV = "metrics.csv"
MODEL = "model.ftc"  # final global state and masks (shared.codec.save)
MODEL_SPEC = "model-spec.json"  # what export needs to rebuild the model without the dataset
CHECKPOINT = "checkpoint.json"
CHECKPOINT_WEIGHTS = "checkpoint-{round}.ftc"  # the weights of the checkpoint after that round
RUN_CONFIG = "run_config.toml"  # the flat config handed to `flwr run`
RUN_LOG = "run.log"
COMPARISON_CSV = "comparison.csv"  # fedtiny compare
COMPARISON_MD = "comparison.md"
ROUND_PLOTS = {"accuracy": "accuracy.png", "bytes": "bytes.png"}  # one value per round
LAYER_DENSITY_PLOT = "layer_density.png"  # density and kept weights of each layer's final mask
COMPARISON_PLOTS = {  # fedtiny compare, by x axis
    "density": "accuracy_vs_density.png",
    "round": "accuracy_vs_round.png",
    "bytes": "accuracy_vs_bytes.png",
}
SUPERLINK_LOG = "superlink.log"  # in the run's folder (simulation, beside superlink.pid) or DEPLOY_DIR (deploy-local)
DEPLOY_DIR = "deploy"  # deploy-local: certificates, node keys, each process's FLWR_HOME and log


def safe_name(text: str) -> str:
    """`text` as a folder name that every shell and file system takes: each run of characters other than
    letters, digits, `.`, `_` and `-` becomes one `-` (`mypkg.methods:Mine` -> `mypkg.methods-Mine`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def default_output_dir(method: str, root: Path | None = None) -> Path:
    """outputs/<timestamp>-<method> under `root` (default: the current directory), resolved."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return ((root or Path.cwd()) / "outputs" / f"{stamp}-{safe_name(method)}").resolve()
