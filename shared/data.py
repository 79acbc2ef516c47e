"""Datasets: loaders by name, a compact in-memory bundle, and batching.

Images stay compact in memory (Fashion-MNIST and CIFAR-10 as uint8); scaling to [0, 1] and the
per-channel normalization happen per batch in `to_tensor`. `load_dataset` caches bundles
in-process because every simulated client in a process reads the same arrays.

A user's own dataset: set `dataset.name` to `package.module:callable`. The callable is called
with the keyword arguments it accepts among `path`, `seed` and `test_fraction`, and returns a
`DataBundle` or a tuple `(x_train, y_train, x_test, y_test)`: images (N, C, H, W) or (N, H, W),
uint8 (0..255) or float (already in [0, 1]); integer labels 0..K-1. For a tuple the number of
classes is inferred and the per-channel mean and std are computed on the training images.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from shared.registry import call_user
from shared.bundle import DATASETS, Batches, DataBundle, DataLoader, batches, channel_stats, to_tensor
from shared.dataset_files import (
    CIFAR10_MEAN, CIFAR10_STD, FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, MAX_CIFAR_BATCH_BYTES,
    MAX_IDX_BYTES, load_cifar10, load_fashion_mnist, read_idx,
)

if TYPE_CHECKING:
    from shared.config import Config

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "DATASETS", "FASHION_MNIST_DIR", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
    "MAX_CIFAR_BATCH_BYTES", "MAX_IDX_BYTES", "Batches", "DataBundle", "DataLoader", "batches", "channel_stats",
    "load_cifar10", "load_dataset", "load_digits", "load_fashion_mnist", "load_for", "read_idx", "to_tensor",
]


def load_dataset(
    name: str, path: str = "", seed: int = 0, test_fraction: float = 0.2, trusted: Iterable[str] = ()
) -> DataBundle:
    """The dataset `name` (a DATASETS key or `package.module:callable` from a `trusted` package),
    cached in-process.

    The arrays are read-only because the cached bundle is shared by every caller in the process.
    """
    return _load_cached(name, path, int(seed), float(test_fraction), tuple(trusted))


def load_for(config: Config) -> DataBundle:
    """The dataset of a validated run config (its `dataset` section and seed), cached like `load_dataset`."""
    d = config.dataset
    return load_dataset(d.name, d.path, config.seed, d.test_fraction, config.trusted)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, path: str, seed: int, test_fraction: float, trusted: tuple[str, ...]) -> DataBundle:
    loader = DATASETS.get(name, trusted)
    if name in DATASETS:
        result = loader(path, seed, test_fraction)
    else:
        result = call_user(_call_user_loader, f"dataset {name!r}", loader, path=path, seed=seed, test_fraction=test_fraction)
    bundle = _as_bundle(result, name)
    for array in (bundle.x_train, bundle.y_train, bundle.x_test, bundle.y_test):
        array.setflags(write=False)
    return bundle


def _call_user_loader(fn: Callable, **kwargs: object) -> object:
    """Call a user's loader with the keyword arguments its signature accepts."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _as_bundle(result: object, name: str) -> DataBundle:
    """A DataBundle from a loader's result: a DataBundle or (x_train, y_train, x_test, y_test)."""
    if isinstance(result, DataBundle):
        return result
    if not (isinstance(result, (tuple, list)) and len(result) == 4):
        raise ValueError(
            f"dataset {name!r} must return a DataBundle or a tuple (x_train, y_train, x_test, y_test), "
            f"got {type(result).__name__}"
        )
    x_train, y_train, x_test, y_test = (np.asarray(a) for a in result)
    x_train, x_test = _as_images(x_train, name), _as_images(x_test, name)
    y_train, y_test = _as_labels(y_train, name), _as_labels(y_test, name)
    mean, std = channel_stats(x_train)
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return DataBundle(x_train, y_train, x_test, y_test, num_classes, mean, std)


def _as_images(x: np.ndarray, name: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"dataset {name!r}: images must be (N, C, H, W) or (N, H, W), got shape {x.shape}")
    return x if x.dtype == np.uint8 else np.ascontiguousarray(x, dtype=np.float32)


def _as_labels(y: np.ndarray, name: str) -> np.ndarray:
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)) or (y.size and y.min() < 0):
        raise ValueError(f"dataset {name!r}: labels must be a 1-D array of integers >= 0, got {y.dtype} {y.shape}")
    return y.astype(np.int64)


@DATASETS.register("digits")
def load_digits(path: str, seed: int, test_fraction: float) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), split stratified by `test_fraction`."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    mean, std = channel_stats(x_train)
    return DataBundle(x_train, y_train, x_test, y_test, 10, mean, std)
