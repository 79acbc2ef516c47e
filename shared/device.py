"""Where tensors live: the `device` config key and batches that already sit on that device.

`device` is `auto` (CUDA when this process sees a GPU, else the CPU), `cpu`, `cuda` (the current
GPU: in a Ray simulation with `simulation.gpus_per_client` > 0, the one Ray gave this client) or
`cuda:N`. Every process resolves it for itself (ServerApp, each ClientApp), so `auto` follows
the hardware each one sees. On the CPU nothing changes: models and the CPU batches of
`shared.data` are used exactly as before. On a GPU a client's partition (and the server's test
set) is normalized once, moved to the device once and cut into batches there, so no batch is
copied from the host; tensors return to the host only for the codec (`to_cpu`).
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(ValueError):
    """A device name that is malformed or names hardware this process does not have (one line)."""


def resolve(name: str) -> torch.device:
    """The torch device `name` stands for in this process; DeviceError if it is unusable here."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        raise DeviceError(f"must be {DEVICE_CHOICES}")
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda") if available else torch.device("cpu")
    if not available:
        raise DeviceError(
            f"asks for CUDA, but this torch ({torch.__version__}) sees no CUDA GPU; use device=cpu or auto, "
            "or install torch's CUDA build (docs/gpus-and-clusters.md)"
        )
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"names GPU {index}, but this process sees {count} (cuda:0 to cuda:{count - 1})")
    return torch.device(name)


def to_cpu(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors on the host, for the codec (the same tensors, uncopied, when already there)."""
    return {name: t.cpu() for name, t in tensors.items()}


class DeviceBatches:
    """Re-iterable (x, y) batches cut from tensors that already live on the device.

    The order is `shared.data.Batches`' for the same seed (numpy's permutation), so a GPU run
    visits a client's examples in the CPU run's order.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(x) != len(y):
            raise ValueError(f"batches: {len(x)} images but {len(y)} labels")
        self.x, self.y, self.batch_size = x, y, batch_size
        order = np.random.default_rng(seed).permutation(len(x)) if shuffle else None
        self.order = None if order is None else torch.from_numpy(order).to(x.device)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.x), self.batch_size):
            if self.order is None:
                yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
            else:
                idx = self.order[start : start + self.batch_size]
                yield self.x.index_select(0, idx), self.y.index_select(0, idx)


def on_device(x: Tensor, y: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """A normalized image tensor and its labels moved to `device` once (pinned first for a GPU copy)."""
    labels = torch.tensor(np.asarray(y), dtype=torch.int64)
    if device.type == "cuda":
        x, labels = x.pin_memory(), labels.pin_memory()
    return x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
