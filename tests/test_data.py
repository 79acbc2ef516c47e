"""Specifications of shared/data.py: dataset loaders, errors, caching, normalization, batching."""

from __future__ import annotations

import gzip
import os
import pickle
import resource
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from shared import dataset_files
from shared.data import DATASETS, DataBundle, batches, load_dataset, read_idx, to_tensor

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped like the published Fashion-MNIST files."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(directory: Path, n_train: int = 6, n_test: int = 4) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return directory


def fake_cifar10(directory: Path, per_batch: int = 3) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        record = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
        }
        with open(directory / stem, "wb") as f:
            pickle.dump(record, f)
    return directory


# key -> (path factory, expected train length, test length, input shape); every DATASETS key needs one.
DATASET_CASES = {
    "digits": (lambda tmp: "", 1437, 360, (1, 8, 8)),
    "fashion-mnist": (lambda tmp: str(fake_fashion_mnist(tmp / "fmnist")), 6, 4, (1, 28, 28)),
    "cifar10": (lambda tmp: str(fake_cifar10(tmp / "cifar")), 15, 3, (3, 32, 32)),
}


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_loads_with_its_shapes_and_classes(name: str, tmp_path: Path) -> None:
    make_path, n_train, n_test, shape = DATASET_CASES[name]
    bundle = load_dataset(name, make_path(tmp_path), seed=0, test_fraction=0.2)
    assert (len(bundle.x_train), len(bundle.x_test)) == (n_train, n_test)
    assert bundle.input_shape == shape
    assert bundle.x_test.shape[1:] == shape
    assert bundle.y_train.dtype == np.int64 and bundle.y_test.dtype == np.int64
    assert bundle.num_classes == 10
    assert len(bundle.mean) == len(bundle.std) == shape[0]
    assert bundle.x_train.dtype in (np.uint8, np.float32)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package_stays_uint8() -> None:
    bundle = load_dataset("fashion-mnist")
    assert bundle.x_train.shape == (60000, 1, 28, 28) and bundle.x_test.shape == (10000, 1, 28, 28)
    assert bundle.x_train.dtype == np.uint8
    assert set(np.unique(bundle.y_train)) == set(range(10))
    assert np.bincount(bundle.y_test).tolist() == [1000] * 10


def test_digits_split_is_stratified_deterministic_and_scaled_to_unit_range() -> None:
    a = load_dataset("digits", seed=3, test_fraction=0.25)
    b = load_dataset("digits", seed=3, test_fraction=0.25)
    c = load_dataset("digits", seed=4, test_fraction=0.25)
    assert np.array_equal(a.y_test, b.y_test) and np.array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.y_test, c.y_test)
    assert len(a.y_test) == 450
    per_class = np.bincount(a.y_train) + np.bincount(a.y_test)
    assert np.abs(np.bincount(a.y_test) - 0.25 * per_class).max() <= 1  # stratified
    assert a.x_train.dtype == np.float32 and a.x_train.min() == 0.0 and a.x_train.max() == 1.0


def test_fashion_mnist_missing_directory_names_the_config_key_and_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere") in message
    assert "dataset.path" in message and "apt-get install dataset-fashion-mnist" in message


def test_fashion_mnist_missing_file_names_the_file_and_config_key(tmp_path: Path) -> None:
    directory = fake_fashion_mnist(tmp_path / "fmnist")
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*dataset.path"):
        load_dataset("fashion-mnist", str(directory))


def test_cifar10_without_path_names_the_config_key() -> None:
    with pytest.raises(ValueError, match="dataset.path"):
        load_dataset("cifar10", "")


def test_cifar10_missing_batch_names_the_file_and_config_key(tmp_path: Path) -> None:
    directory = fake_cifar10(tmp_path / "cifar")
    (directory / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.*dataset.path"):
        load_dataset("cifar10", str(directory))


def test_cifar10_accepts_the_parent_of_the_extracted_folder(tmp_path: Path) -> None:
    fake_cifar10(tmp_path / "cifar-10-batches-py")
    assert load_dataset("cifar10", str(tmp_path)).x_train.shape == (15, 3, 32, 32)


def test_cifar10_keeps_row_major_channel_layout(tmp_path: Path) -> None:
    directory = fake_cifar10(tmp_path / "cifar")
    with open(directory / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")[b"data"][0]
    bundle = load_dataset("cifar10", str(directory))
    assert np.array_equal(bundle.x_train[0, 0].ravel(), first[:1024])
    assert np.array_equal(bundle.x_train[0, 2].ravel(), first[2048:])


def test_corrupt_idx_magic_number_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x0D, 3]) + (1).to_bytes(4, "big") * 3 + b"\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(str(path), 3)


def test_truncated_idx_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "short-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28)) + b"\x00" * 100)
    with pytest.raises(ValueError, match="header says"):
        read_idx(str(path), 3)


def test_corrupt_fashion_mnist_directory_is_a_value_error(tmp_path: Path) -> None:
    directory = fake_fashion_mnist(tmp_path / "fmnist")
    (directory / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", str(directory))


def rss_growth_mb(fn) -> float:
    """Peak resident memory growth of this process while `fn` runs, in MB (Linux ru_maxrss is in KiB)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def idx_header(*dims: int) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def test_idx_gzip_inflating_past_its_header_is_refused_without_inflating_it(tmp_path: Path) -> None:
    path = tmp_path / "bomb-idx3-ubyte.gz"
    stream = zlib.compressobj(9, zlib.DEFLATED, 31)  # a gzip of the header and 256 MB of zeros, built in chunks
    chunk = b"\x00" * (1 << 20)
    with open(path, "wb") as f:
        f.write(stream.compress(idx_header(2, 28, 28)))
        for _ in range(256):
            f.write(stream.compress(chunk))
        f.write(stream.flush())
    assert path.stat().st_size < 1 << 20

    def read() -> None:
        with pytest.raises(ValueError, match=r"bomb-idx3-ubyte.gz: header says \(2, 28, 28\) = 1568 bytes but the file holds more"):
            read_idx(str(path), 3)

    assert rss_growth_mb(read) < 20


def test_idx_header_claiming_absurd_dims_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(idx_header(60_000_000, 28, 28) + b"\x00" * 100)
    with pytest.raises(ValueError, match=r"huge-idx3-ubyte.gz: header claims .* over the limit"):
        read_idx(str(path), 3)


def test_fashion_mnist_images_of_another_size_are_a_value_error(tmp_path: Path) -> None:
    directory = fake_fashion_mnist(tmp_path / "fmnist")
    write_idx(directory / "t10k-images-idx3-ubyte.gz", np.zeros((4, 30, 30)))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz holds images of \(30, 30\)"):
        load_dataset("fashion-mnist", str(directory))


class _RunsCode:
    """Unpickling this calls os.system: what a crafted CIFAR-10 batch would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_batch_that_would_run_code_is_refused_with_one_line(tmp_path: Path) -> None:
    directory, marker = fake_cifar10(tmp_path / "cifar"), tmp_path / "ran"
    with open(directory / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _RunsCode(marker), b"labels": []}, f)
    with pytest.raises(ValueError) as err:
        load_dataset("cifar10", str(directory))
    assert not marker.exists()
    line = str(err.value)
    assert "\n" not in line and "data_batch_3 is not a CIFAR-10 python batch" in line
    assert "system, which a CIFAR-10 batch never holds; refused without running it" in line


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_cifar10_batches_of_every_pickle_protocol_load(tmp_path: Path, protocol: int) -> None:
    directory = fake_cifar10(tmp_path / "cifar")
    record = {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 7], b"filenames": [b"a.png", b"b.png"],
              b"data": np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)}
    (directory / "test_batch").write_bytes(pickle.dumps(record, protocol=protocol))
    bundle = load_dataset("cifar10", str(directory))
    assert np.array_equal(bundle.x_test.reshape(2, -1), record[b"data"]) and bundle.y_test.tolist() == [3, 7]


def test_cifar10_batch_pickled_with_numpy_1_names_loads(tmp_path: Path) -> None:
    """The published batches name numpy.core.multiarray (numpy 1); numpy 2 calls it numpy._core."""
    directory = fake_cifar10(tmp_path / "cifar")
    data = np.arange(3072, dtype=np.uint8).reshape(1, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [5]}, protocol=2)
    assert b"numpy._core.multiarray" in raw
    (directory / "test_batch").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    bundle = load_dataset("cifar10", str(directory))
    assert np.array_equal(bundle.x_test.reshape(1, -1), data)


@pytest.mark.parametrize("content", [[1, 2, 3], {b"data": np.zeros((1, 3072), dtype=object), b"labels": [1]}],
                         ids=["a-list", "object-array"])
def test_cifar10_batch_of_other_types_is_a_value_error(tmp_path: Path, content: object) -> None:
    directory = fake_cifar10(tmp_path / "cifar")
    (directory / "data_batch_1").write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 python batch"):
        load_dataset("cifar10", str(directory))


def test_cifar10_oversize_batch_file_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = fake_cifar10(tmp_path / "cifar")
    monkeypatch.setattr(dataset_files, "MAX_CIFAR_BATCH_BYTES", 1000)
    with pytest.raises(ValueError, match="data_batch_1 is .* bytes, over the limit of 1000"):
        load_dataset("cifar10", str(directory))


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def test_custom_dataset_tuple_infers_classes_and_normalization(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(
        tmp_path,
        "user_dataset_tuple",
        """
        import numpy as np

        def load(path, seed):
            x_train = np.zeros((4, 5, 5), dtype=np.uint8)
            x_train[:2] = 255
            y_train = np.array([0, 1, 2, 3])
            x_test = np.zeros((2, 5, 5), dtype=np.uint8)
            return x_train, y_train, x_test, np.array([4, 0])
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bundle = load_dataset("user_dataset_tuple:load", "anything", seed=1, trusted=["user_dataset_tuple"])
    assert bundle.input_shape == (1, 5, 5)
    assert bundle.num_classes == 5
    assert bundle.mean == pytest.approx((0.5,)) and bundle.std == pytest.approx((0.5,))
    assert bundle.y_test.dtype == np.int64


def test_custom_dataset_may_return_a_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(
        tmp_path,
        "user_dataset_bundle",
        """
        import numpy as np
        from shared.data import DataBundle

        def load():
            x = np.ones((3, 2, 4, 4), dtype=np.float32)
            y = np.array([0, 1, 0], dtype=np.int64)
            return DataBundle(x, y, x, y, 2, (0.0, 0.0), (1.0, 1.0))
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bundle = load_dataset("user_dataset_bundle:load", trusted=["user_dataset_bundle"])
    assert bundle.input_shape == (2, 4, 4) and bundle.num_classes == 2


def test_custom_dataset_with_a_wrong_return_type_is_a_value_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(tmp_path, "user_dataset_wrong", "def load():\n    return [1, 2]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="DataBundle or a tuple"):
        load_dataset("user_dataset_wrong:load", trusted=["user_dataset_wrong"])


def test_unknown_dataset_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match="cifar10, digits, fashion-mnist"):
        load_dataset("imagenet")


def test_load_dataset_is_cached_and_read_only() -> None:
    a = load_dataset("digits", "", 0, 0.2)
    assert load_dataset("digits", path="", seed=0, test_fraction=0.2) is a
    assert not a.x_train.flags.writeable and not a.y_train.flags.writeable


def small_bundle() -> DataBundle:
    x = np.arange(10 * 2 * 2 * 2, dtype=np.uint8).reshape(10, 2, 2, 2)
    y = np.arange(10, dtype=np.int64)
    return DataBundle(x, y, x, y, 10, (0.5, 0.25), (0.25, 0.5))


def test_to_tensor_scales_uint8_and_normalizes_per_channel() -> None:
    bundle = small_bundle()
    x = np.zeros((1, 2, 1, 1), dtype=np.uint8)
    x[0, 1] = 255
    out = to_tensor(bundle, x)
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([(0 - 0.5) / 0.25, (1 - 0.25) / 0.5])


def test_to_tensor_keeps_float_images_on_their_scale() -> None:
    x, y = np.zeros((1, 1, 1, 1), np.float32), np.zeros(1, np.int64)
    bundle = DataBundle(x, y, x, y, 1, (0.5,), (0.5,))
    assert to_tensor(bundle, np.ones((1, 1, 1, 1), np.float32)).item() == pytest.approx(1.0)


def test_batches_cover_every_sample_once_in_a_seeded_order() -> None:
    bundle = small_bundle()
    first = list(batches(bundle, bundle.x_train, bundle.y_train, batch_size=4, shuffle=True, seed=7))
    again = list(batches(bundle, bundle.x_train, bundle.y_train, batch_size=4, shuffle=True, seed=7))
    other = list(batches(bundle, bundle.x_train, bundle.y_train, batch_size=4, shuffle=True, seed=8))
    labels = torch.cat([y for _, y in first])
    assert [len(y) for _, y in first] == [4, 4, 2]
    assert sorted(labels.tolist()) == list(range(10))
    assert labels.tolist() == torch.cat([y for _, y in again]).tolist()
    assert labels.tolist() != torch.cat([y for _, y in other]).tolist()
    assert first[0][0].dtype == torch.float32 and first[0][0].shape == (4, 2, 2, 2) and labels.dtype == torch.int64


def test_batches_without_shuffle_keep_order_and_are_reiterable() -> None:
    bundle = small_bundle()
    stream = batches(bundle, bundle.x_train, bundle.y_train, batch_size=3, shuffle=False, seed=0)
    assert len(stream) == 4
    assert torch.cat([y for _, y in stream]).tolist() == list(range(10))
    assert torch.cat([y for _, y in stream]).tolist() == list(range(10))


def _shared_nested_lists(depth: int = 22) -> list:
    """A few hundred bytes of pickle that `np.asarray` would expand to 2**depth elements: each level
    holds the level below twice (the pickle memo shares it)."""
    level: list = [0]
    for _ in range(depth):
        level = [level, level]
    return level


@pytest.mark.parametrize("key", [b"data", b"labels"])
def test_cifar10_batch_of_shared_nested_lists_is_refused_before_it_is_materialised(tmp_path: Path, key: bytes) -> None:
    directory = fake_cifar10(tmp_path / "cifar")
    record = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [1, 2], key: _shared_nested_lists()}
    raw = pickle.dumps(record)
    assert len(raw) < 10_000
    (directory / "data_batch_2").write_bytes(raw)
    with pytest.raises(ValueError, match="data_batch_2 is not a CIFAR-10 python batch") as err:
        load_dataset("cifar10", str(directory))
    what = "its data is a list, not an" if key == b"data" else "its labels are 2 items, not a list of 2 ints"
    assert what in str(err.value) and "\n" not in str(err.value)
