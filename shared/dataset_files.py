"""The built-in datasets read from files: Fashion-MNIST (IDX files) and CIFAR-10 (python batches).

Files are hostile until read: sizes are bounded before anything is allocated, and CIFAR-10's
pickled batches are read by an unpickler that builds numpy arrays and nothing else.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
import zlib
from typing import Callable

import numpy as np

from shared.bundle import DATASETS, DataBundle, channel_stats

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


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


def _batch_arrays(record: object) -> tuple[np.ndarray, np.ndarray]:
    """(data, labels) of an unpickled batch, its structure checked before anything is converted.

    A published batch holds `data` as an (N, 3072) uint8 array and `labels` as a list of N ints.
    Only that is accepted: `np.asarray` of anything else (nested lists that share their items,
    which a pickle of a few KB can hold) would materialise it before any shape check.
    """
    if not isinstance(record, dict):
        raise TypeError(f"it holds a {type(record).__name__}, not a dict")
    data, labels = record.get(b"data"), record.get(b"labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32):
        what = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise TypeError(f"its data is a {what}, not an (N, 3072) uint8 array")
    if not (isinstance(labels, list) and len(labels) == len(data) and all(type(v) is int for v in labels)):
        what = f"{len(labels)} items" if isinstance(labels, list) else type(labels).__name__
        raise TypeError(f"its labels are {what}, not a list of {len(data)} ints")
    return data, np.asarray(labels, dtype=np.int64)


def _read_cifar_batch(file: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 "python version" batch, read with `_BatchUnpickler` (no code runs, whatever the file holds)."""
    size = os.path.getsize(file)
    if size > MAX_CIFAR_BATCH_BYTES:
        raise ValueError(f"cifar10: {file} is {size} bytes, over the limit of {MAX_CIFAR_BATCH_BYTES} for one batch")
    try:
        with open(file, "rb") as f:
            record = _BatchUnpickler(f, encoding="bytes").load()
        data, labels = _batch_arrays(record)
    except Exception as exc:  # noqa: BLE001  any failure of a file from outside is one line naming it
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"cifar10: {file} is not a CIFAR-10 python batch ({reason})") from None
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
