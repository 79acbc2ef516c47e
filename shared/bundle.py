"""A dataset in memory and its batches: `DataBundle`, the `DATASETS` registry, batching.

Images stay compact in memory (Fashion-MNIST and CIFAR-10 as uint8); scaling to [0, 1] and the
per-channel normalization happen per batch in `to_tensor`. Loaders register into `DATASETS`
(`shared.data` loads by name; `shared.dataset_files` holds the loaders that read files).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from shared.registry import Registry

DataLoader = Callable[[str, int, float], "DataBundle"]
DATASETS: Registry[DataLoader] = Registry("dataset", allow_import=True)


@dataclass(frozen=True, eq=False)
class DataBundle:
    """Train and test arrays of one dataset, kept compact (uint8 or float32), plus normalization.

    `mean` and `std` are per channel, on the [0, 1] scale (uint8 images are divided by 255 first).
    """

    x_train: np.ndarray  # (N, C, H, W) uint8 or float32
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(
                    f"DataBundle: x_{split} must be (N, C, H, W) and y_{split} (N,), got {x.shape} and {y.shape}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"DataBundle: train images {self.x_train.shape[1:]} != test images {self.x_test.shape[1:]}"
            )
        channels = self.x_train.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"DataBundle: mean and std need {channels} values (one per channel)")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale, accumulated in float64 chunks (no full copy)."""
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].astype(np.float64) / scale
        total += part.sum(axis=(0, 2, 3))
        squares += (part**2).sum(axis=(0, 2, 3))
    count = max(1, len(x) * x.shape[2] * x.shape[3])
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std[std < 1e-8] = 1.0
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def to_tensor(bundle: DataBundle, x: np.ndarray) -> torch.Tensor:
    """A float32 batch (N, C, H, W) scaled to [0, 1] and normalized with the bundle's mean and std."""
    array = np.array(x, dtype=np.float32)  # a writable copy of the slice
    if np.asarray(x).dtype == np.uint8:
        array /= 255.0
    tensor = torch.from_numpy(array)
    channels = len(bundle.mean)
    mean = torch.tensor(bundle.mean, dtype=torch.float32).view(1, channels, 1, 1)
    std = torch.tensor(bundle.std, dtype=torch.float32).view(1, channels, 1, 1)
    return tensor.sub_(mean).div_(std)


class Batches:
    """Re-iterable (x, y) tensor batches over arrays, converted lazily one batch at a time.

    The order depends only on `seed`, so every iteration yields the same batches; pass a new seed
    (e.g. per round and epoch) for a new order.
    """

    def __init__(self, bundle: DataBundle, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(x) != len(y):
            raise ValueError(f"batches: {len(x)} images but {len(y)} labels")
        self.bundle, self.x, self.y = bundle, x, y
        self.batch_size = batch_size
        self.order = np.random.default_rng(seed).permutation(len(x)) if shuffle else None

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.x), self.batch_size):
            if self.order is None:
                xs, ys = self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
            else:
                idx = self.order[start : start + self.batch_size]
                xs, ys = self.x[idx], self.y[idx]
            yield to_tensor(self.bundle, xs), torch.tensor(ys, dtype=torch.int64)


def batches(
    bundle: DataBundle, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int
) -> Batches:
    """Deterministic (FloatTensor, LongTensor) batches of `x`, `y`; re-iterable, with `len()`."""
    return Batches(bundle, x, y, batch_size, shuffle, seed)
