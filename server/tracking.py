"""Experiment tracking: TensorBoard event files in the run's directory (`tracking=tensorboard`, the default).

`tensorboard --logdir outputs` then shows every run side by side. Per round: central test
accuracy and loss (rounds with a central evaluation), federated accuracy (rounds with a
federated evaluation), the clients' mean training loss, density, bytes up and down, seconds;
per layer: the density of its mask; once: the resolved config as text. The numbers are the
ones metrics.json holds, written through `torch.utils.tensorboard`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from server.recorder import RoundRecord

SCALARS = {  # tag -> RoundRecord field
    "central/accuracy": "accuracy",
    "central/loss": "loss",
    "federated/accuracy": "federated_accuracy",
    "train/loss": "train_loss",
    "density": "density",
    "bytes/up": "bytes_up",
    "bytes/down": "bytes_down",
    "seconds": "seconds",
}
LAYER_PREFIX = "layer_density/"
CONFIG_TAG = "config"


class Tracker:
    """Writes one run's scalars and config to TensorBoard event files in `log_dir`."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def config(self, yaml_text: str) -> None:
        """The resolved config, as a Markdown code block (TensorBoard's Text tab renders Markdown)."""
        self.writer.add_text(CONFIG_TAG, "```yaml\n" + yaml_text + "```", 0)

    def round(self, record: RoundRecord, layer_density: Mapping[str, float] | None = None) -> None:
        """A round's scalars at step `record.round`; fields that were not measured (None) are left out."""
        for tag, name in SCALARS.items():
            value = getattr(record, name)
            if value is not None:
                self.writer.add_scalar(tag, float(value), record.round)
        for layer, value in (layer_density or {}).items():
            self.writer.add_scalar(LAYER_PREFIX + layer, float(value), record.round)
        self.writer.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(kind: str, log_dir: Path) -> Tracker | None:
    """The run's tracker (`tracking` config key): `tensorboard` or None for `none`."""
    if kind == "none":
        return None
    if kind == "tensorboard":
        return Tracker(log_dir)
    raise ValueError(f"unknown tracking {kind!r}; known: tensorboard, none")
