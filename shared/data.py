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
import gzip
import importlib
import inspect
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch

from shared.registry import Registry

if TYPE_CHECKING:
    from shared.config import Config

DataLoader = Callable[[str, int, float], "DataBundle"]
DATASETS: Registry[DataLoader] = Registry("dataset", allow_import=True)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


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


def load_dataset(
    name: str, path: str = "", seed: int = 0, test_fraction: float = 0.2, trusted: Iterable[str] = (),
    settings: tuple[tuple[str, object], ...] = (),
) -> DataBundle:
    """The dataset `name` (a DATASETS key or `package.module:callable` from a `trusted` package),
    cached in-process. `settings` are keyword arguments of a built-in loader (synthetic's).

    The arrays are read-only because the cached bundle is shared by every caller in the process.
    """
    return _load_cached(name, path, int(seed), float(test_fraction), tuple(trusted), tuple(settings))


def load_for(config: Config) -> DataBundle:
    """The dataset of a validated run config (its `dataset` section and seed), cached like `load_dataset`."""
    d = config.dataset
    settings = tuple(vars(d.synthetic).items()) if d.name == "synthetic" else ()
    return load_dataset(d.name, d.path, config.seed, d.test_fraction, config.trusted, settings)


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, path: str, seed: int, test_fraction: float, trusted: tuple[str, ...],
                 settings: tuple[tuple[str, object], ...]) -> DataBundle:
    loader = DATASETS.get(name, trusted)
    if name in DATASETS:
        result = loader(path, seed, test_fraction, **dict(settings))
    else:
        result = _call_user_loader(loader, path=path, seed=seed, test_fraction=test_fraction)
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


# ---------------------------------------------------------------------------------------------
# Built-in datasets


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


_IDX_UBYTE = 0x08
MAX_IDX_BYTES = 2**28
"""Largest IDX payload read (256 MiB; Fashion-MNIST's training images are 47 MB): a header naming
more is refused before anything is inflated."""


def read_idx(path: str, ndim: int, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) of unsigned bytes with `ndim` dimensions.

    The header is read first and the payload size computed from its dims; a gzipped file is then
    inflated to exactly that size and no further, so a small file claiming (or inflating to)
    gigabytes costs nothing. Raises ValueError naming the file when the magic number, the dims
    (more than `max_bytes`) or the size is wrong.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4 + 4 * ndim or header[:3] != bytes([0, 0, _IDX_UBYTE]) or header[3] != ndim:
                raise ValueError(
                    f"{path}: not an IDX file of {ndim}-D unsigned bytes (bad magic number); the file is corrupt"
                )
            dims = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            expected = math.prod(dims)
            if expected > max_bytes:
                raise ValueError(f"{path}: header claims {dims} = {expected} bytes, over the limit of {max_bytes}; "
                                 "the file is corrupt")
            data = f.read(expected)
            extra = len(f.read(1))
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read IDX file ({exc}); the file is corrupt, download it again") from exc
    if len(data) != expected or extra:
        held = f"{len(data)}" if not extra else f"more than {expected}"
        raise ValueError(f"{path}: header says {dims} = {expected} bytes but the file holds {held}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find_file(directory: str, stem: str, dataset: str, hint: str) -> str:
    for candidate in (f"{stem}.gz", stem):
        full = os.path.join(directory, candidate)
        if os.path.isfile(full):
            return full
    raise FileNotFoundError(f"{dataset}: no {stem}.gz in {directory}; {hint}")


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(path: str, seed: int, test_fraction: float) -> DataBundle:
    """Fashion-MNIST (Xiao et al., arXiv 1708.07747) from the standard IDX .gz files, kept as uint8.

    Default directory: where Debian's `dataset-fashion-mnist` package installs the files.
    `seed` and `test_fraction` are unused: the dataset has its own test split.
    """
    directory = os.path.expanduser(path or FASHION_MNIST_DIR)
    hint = (
        "set dataset.path to the directory holding the Fashion-MNIST IDX .gz files "
        "or run `apt-get install dataset-fashion-mnist`"
    )
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"fashion-mnist: directory {directory} not found; {hint}")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_file = _find_file(directory, f"{prefix}-images-idx3-ubyte", "fashion-mnist", hint)
        labels_file = _find_file(directory, f"{prefix}-labels-idx1-ubyte", "fashion-mnist", hint)
        images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"fashion-mnist: {images_file} holds images of {images.shape[1:]}, expected (28, 28)")
        if len(images) != len(labels):
            raise ValueError(
                f"fashion-mnist: {images_file} has {len(images)} images but {labels_file} has {len(labels)} labels"
            )
        if labels.size and labels.max() >= 10:
            raise ValueError(f"fashion-mnist: {labels_file} has label {labels.max()} (expected 0..9); corrupt file")
        arrays[split] = (images[:, None], labels.astype(np.int64))
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    return DataBundle(x_train, y_train, x_test, y_test, 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD)


MAX_CIFAR_BATCH_BYTES = 2**28
"""Largest CIFAR-10 batch file read (a real one is 31 MB)."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch and nothing else: a dict of bytes keys, lists, bytes and
    uint8 numpy arrays. `find_class` resolves only numpy's array reconstruction (numpy 1 and 2
    names, protocols 2 to 5) and refuses every other global, so a crafted file runs no code.
    """

    def find_class(self, module: str, name: str) -> object:
        allowed = _BATCH_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a CIFAR-10 batch never holds; refused without running it"
            )
        return allowed()


def _numpy_attr(names: tuple[str, ...], attr: str) -> Callable[[], object]:
    def resolve() -> object:
        for module in names:
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"this numpy has no {attr} in {names}")

    return resolve


class _NDArray:
    """Stands in for numpy.ndarray in a batch: only `_reconstruct` may use it (calling it is refused)."""

    def __new__(cls, *args: object, **kwargs: object) -> None:
        raise pickle.UnpicklingError("a CIFAR-10 batch never calls numpy.ndarray")


def _reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
    """numpy's `_reconstruct(ndarray, (0,), b"b")`, the empty array a pickled array is then filled into."""
    if subtype is not _NDArray or shape != (0,):
        raise pickle.UnpicklingError("a CIFAR-10 batch reconstructs only empty numpy arrays before filling them")
    return _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")()(np.ndarray, (0,), dtype)


def _dtype(*args: object) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("a CIFAR-10 batch holds no object arrays")
    return dtype


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol 2 uses it for bytes: str to latin-1 bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("a CIFAR-10 batch encodes only latin-1 text")
    return text.encode("latin1")


_FROMBUFFER = _numpy_attr(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
_BATCH_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    **{(f"{m}.multiarray", "_reconstruct"): (lambda: _reconstruct) for m in ("numpy._core", "numpy.core")},
    **{(f"{m}.numeric", "_frombuffer"): _FROMBUFFER for m in ("numpy._core", "numpy.core")},
    ("numpy", "ndarray"): lambda: _NDArray,
    ("numpy", "dtype"): lambda: _dtype,
    ("_codecs", "encode"): lambda: _latin1,
}


def _read_cifar_batch(file: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 "python version" batch, read with `_BatchUnpickler` (no code runs, whatever the file holds)."""
    size = os.path.getsize(file)
    if size > MAX_CIFAR_BATCH_BYTES:
        raise ValueError(f"cifar10: {file} is {size} bytes, over the limit of {MAX_CIFAR_BATCH_BYTES} for one batch")
    try:
        with open(file, "rb") as f:
            record = _BatchUnpickler(f, encoding="bytes").load()
        if not isinstance(record, dict):
            raise TypeError(f"it holds a {type(record).__name__}, not a dict")
        data = np.asarray(record[b"data"], dtype=np.uint8)
        labels = np.asarray(record[b"labels"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001  any failure of a file from outside is one line naming it
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"cifar10: {file} is not a CIFAR-10 python batch ({reason})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"cifar10: {file} holds data {data.shape} and {len(labels)} labels, expected (N, 3072) and N")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise ValueError(f"cifar10: {file} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


@DATASETS.register("cifar10")
def load_cifar10(path: str, seed: int, test_fraction: float) -> DataBundle:
    """CIFAR-10 (Krizhevsky 2009), python version: `data_batch_1..5` and `test_batch` in `path`.

    `path` may also be the parent of `cifar-10-batches-py`. `seed` and `test_fraction` are unused.
    """
    hint = "set dataset.path to the directory holding data_batch_1..5 and test_batch (CIFAR-10 python version)"
    if not path:
        raise ValueError(f"cifar10 needs a location: {hint}")
    directory = os.path.expanduser(path)
    nested = os.path.join(directory, "cifar-10-batches-py")
    if os.path.isdir(nested):
        directory = nested
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cifar10: directory {directory} not found; {hint}")
    parts = []
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        file = os.path.join(directory, stem)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"cifar10: no {stem} in {directory}; {hint}")
        parts.append(_read_cifar_batch(file))
    x_train = np.concatenate([x for x, _ in parts[:5]])
    y_train = np.concatenate([y for _, y in parts[:5]])
    x_test, y_test = parts[5]
    return DataBundle(x_train, y_train, x_test, y_test, 10, CIFAR10_MEAN, CIFAR10_STD)


import shared.synthetic  # noqa: E402,F401  registers "synthetic" (FedProx's generated clients), which builds on DataBundle
