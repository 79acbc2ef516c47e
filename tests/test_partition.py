"""Specifications of shared/partition.py: owners by seed, label skew, minimum sizes, holdout, warm-up set."""

from __future__ import annotations

import time

import numpy as np
import pytest

from shared import partition
from shared.data import DataBundle
from shared.partition import (
    PARTITIONS,
    cached_owners,
    client_data,
    client_indices,
    partition_owners,
    server_warmup_set,
    split_holdout,
)

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes


def indexed_bundle(labels: np.ndarray, n_test: int = 50) -> DataBundle:
    """Train image i holds the value i, test images hold negative values: provenance is visible."""
    x_train = np.arange(len(labels), dtype=np.float32).reshape(-1, 1, 1, 1)
    x_test = -np.arange(1, n_test + 1, dtype=np.float32).reshape(-1, 1, 1, 1)
    y_test = np.arange(n_test, dtype=np.int64) % 10
    return DataBundle(x_train, labels.astype(np.int64), x_test, y_test, 10, (0.0,), (1.0,))


def label_skew(owners: np.ndarray, labels: np.ndarray, num_clients: int) -> float:
    """Mean over clients of the share of the client's most common class (0.1 = balanced, 1 = one class)."""
    shares = []
    for c in range(num_clients):
        counts = np.bincount(labels[owners == c], minlength=10)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


@pytest.mark.parametrize("scheme", PARTITIONS.names())
def test_partition_is_deterministic_by_seed(scheme: str) -> None:
    a = partition_owners(LABELS, 10, scheme, 0.5, seed=1)
    assert np.array_equal(a, partition_owners(LABELS, 10, scheme, 0.5, seed=1))
    assert not np.array_equal(a, partition_owners(LABELS, 10, scheme, 0.5, seed=2))


@pytest.mark.parametrize("scheme", PARTITIONS.names())
def test_every_sample_is_owned_by_exactly_one_client(scheme: str) -> None:
    owners = partition_owners(LABELS, 7, scheme, 0.3, seed=0)
    assert owners.dtype == np.int32 and owners.shape == LABELS.shape
    union = np.sort(np.concatenate([client_indices(owners, c) for c in range(7)]))
    assert np.array_equal(union, np.arange(len(LABELS)))


@pytest.mark.parametrize("scheme", PARTITIONS.names())
def test_every_client_gets_at_least_two_samples(scheme: str) -> None:
    labels = np.repeat(np.arange(10), 20)  # 200 samples for 100 clients: exactly 2 each on average
    owners = partition_owners(labels, 100, scheme, 0.01, seed=0)
    assert np.bincount(owners, minlength=100).min() >= 2


def test_too_few_samples_still_assigns_every_sample() -> None:
    owners = partition_owners(np.arange(5) % 2, 4, "dirichlet", 0.5, seed=0)
    assert owners.shape == (5,) and owners.min() >= 0 and owners.max() < 4


def test_iid_sizes_differ_by_at_most_one() -> None:
    counts = np.bincount(partition_owners(LABELS, 7, "iid", 0.0, seed=0))
    assert counts.max() - counts.min() <= 1


def test_dirichlet_skew_at_small_alpha_exceeds_iid() -> None:
    skew_iid = label_skew(partition_owners(LABELS, 10, "iid", 0.1, seed=0), LABELS, 10)
    skew_01 = label_skew(partition_owners(LABELS, 10, "dirichlet", 0.1, seed=0), LABELS, 10)
    skew_100 = label_skew(partition_owners(LABELS, 10, "dirichlet", 100.0, seed=0), LABELS, 10)
    assert skew_iid < 0.2
    assert skew_01 > 0.5
    assert skew_01 > skew_100


def test_unknown_scheme_lists_known_names() -> None:
    with pytest.raises(ValueError, match="dirichlet, iid"):
        partition_owners(LABELS, 10, "shards", 0.5, seed=0)


def test_ten_thousand_clients_on_sixty_thousand_labels_is_fast_and_holds_one_array(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(partition, "_OWNERS_CACHE", {})
    labels = np.random.default_rng(0).integers(0, 10, 60_000)
    bundle = indexed_bundle(labels)
    start = time.perf_counter()
    for client_id in (0, 4_999, 9_999):
        data = client_data(bundle, 10_000, client_id, "dirichlet", 0.1, 0.2, seed=0)
        assert len(data.y_train) >= 1 and len(data.y_holdout) >= 1
    assert time.perf_counter() - start < 2.0
    assert len(partition._OWNERS_CACHE) == 1
    floor = partition.min_client_size(0.2)  # what client_data asks the partition for
    owners = cached_owners(bundle.y_train, 10_000, "dirichlet", 0.1, 0, floor)
    assert owners is cached_owners(bundle.y_train, 10_000, "dirichlet", 0.1, 0, floor)
    assert len(partition._OWNERS_CACHE) == 1
    assert owners.dtype == np.int32 and owners.nbytes == 60_000 * 4


def test_a_skewed_partition_tops_every_client_up_to_the_floor_the_data_allow() -> None:
    labels = np.repeat(np.arange(10), 20)  # 200 samples; Dirichlet(0.01) leaves most of 20 clients empty
    skewed = np.bincount(partition_owners(labels, 20, "dirichlet", 0.01, seed=0, min_samples=1), minlength=20)
    assert skewed.min() < 8
    assert np.bincount(partition_owners(labels, 20, "dirichlet", 0.01, seed=0, min_samples=8)).min() == 8
    assert np.bincount(partition_owners(labels, 40, "dirichlet", 0.01, seed=0, min_samples=8)).min() == 5  # 200 // 40


@pytest.mark.parametrize("holdout, size", [(0.2, 8), (0.3, 5), (0.5, 4), (0.1, 15)])
def test_min_client_size_leaves_two_to_train_and_two_held_out(holdout: float, size: int) -> None:
    assert partition.min_client_size(holdout) == size
    for n in (size, size + 1):
        train, held = split_holdout(np.arange(n), holdout, seed=0)
        assert len(train) >= partition.MIN_TRAIN and len(held) >= partition.MIN_HOLDOUT
    train, held = split_holdout(np.arange(size - 1), holdout, seed=0)
    assert len(train) < partition.MIN_TRAIN or len(held) < partition.MIN_HOLDOUT


def test_holdout_is_disjoint_from_train_and_covers_the_client() -> None:
    indices = np.arange(100, 130)
    train, holdout = split_holdout(indices, 0.2, seed=0)
    assert len(holdout) == 6 and len(train) == 24
    assert not set(train) & set(holdout)
    assert np.array_equal(np.sort(np.concatenate([train, holdout])), indices)


def test_holdout_takes_at_least_one_of_two_samples_and_none_of_one() -> None:
    train, holdout = split_holdout(np.array([3, 9]), 0.01, seed=0)
    assert len(train) == 1 and len(holdout) == 1
    train, holdout = split_holdout(np.array([3]), 0.5, seed=0)
    assert train.tolist() == [3] and len(holdout) == 0


def test_holdout_is_deterministic_by_seed() -> None:
    indices = np.arange(50)
    assert np.array_equal(split_holdout(indices, 0.3, 4)[1], split_holdout(indices, 0.3, 4)[1])
    assert not np.array_equal(split_holdout(indices, 0.3, 4)[1], split_holdout(indices, 0.3, 5)[1])


def test_client_data_splits_the_clients_train_samples_only() -> None:
    bundle = indexed_bundle(LABELS)
    seen = []
    for client_id in range(5):
        data = client_data(bundle, 5, client_id, "dirichlet", 0.5, 0.2, seed=0)
        train, holdout = set(data.x_train.ravel()), set(data.x_holdout.ravel())
        assert not train & holdout
        assert np.array_equal(bundle.y_train[data.x_train.ravel().astype(int)], data.y_train)
        seen += list(train | holdout)
    assert sorted(seen) == list(range(len(LABELS)))


def test_client_id_out_of_range_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="client_id 5"):
        client_data(indexed_bundle(LABELS), 5, 5, "iid", 0.5, 0.2, seed=0)


def test_warmup_set_comes_from_train_split_with_shots_per_class() -> None:
    bundle = indexed_bundle(LABELS)
    x, y = server_warmup_set(bundle, shots_per_class=3, seed=0)
    assert (x >= 0).all()  # test images are negative
    assert not set(x.ravel()) & set(bundle.x_test.ravel())
    assert np.bincount(y).tolist() == [3] * 10
    assert np.array_equal(bundle.y_train[x.ravel().astype(int)], y)


def test_warmup_set_is_deterministic_by_seed() -> None:
    bundle = indexed_bundle(LABELS)
    assert np.array_equal(server_warmup_set(bundle, 2, 0)[0], server_warmup_set(bundle, 2, 0)[0])
    assert not np.array_equal(server_warmup_set(bundle, 2, 0)[0], server_warmup_set(bundle, 2, 1)[0])
