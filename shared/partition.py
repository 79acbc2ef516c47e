"""Partition a dataset's training samples among simulated clients, deterministically by seed.

The whole partition is one int32 array of owner ids (one entry per sample), cached in-process,
so 10,000 simulated clients cost one array; a client's indices are computed when it needs them.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from shared.bundle import DataBundle
from shared.registry import Registry

if TYPE_CHECKING:
    from shared.config_schema import Config

MIN_SAMPLES = 2  # partition_owners' default floor: every client gets this many when N >= MIN_SAMPLES * num_clients
MIN_TRAIN = 2  # train-mode batch norm cannot normalize a batch of one
MIN_HOLDOUT = 2  # nor recalibrate on a held-out split of one (FedTiny's adaptive BN selection)

PartitionFn = Callable[[np.ndarray, int, float, np.random.Generator], np.ndarray]
PARTITIONS: Registry[PartitionFn] = Registry("partition")


@PARTITIONS.register("iid")
def iid(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Shuffled samples dealt round-robin: client sizes differ by at most one. `alpha` is unused."""
    owners = np.empty(len(labels), dtype=np.int32)
    owners[rng.permutation(len(labels))] = np.arange(len(labels)) % num_clients
    return owners


@PARTITIONS.register("dirichlet")
def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Label skew: each class is split among the clients by proportions drawn from Dirichlet(alpha).

    T.-M. H. Hsu, H. Qi, M. Brown, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", arXiv 1909.06335; this per-class form (proportions over
    clients, one draw per class) is the one of Li et al., "Federated Learning on Non-IID Data
    Silos: An Experimental Study", arXiv 2102.02079. Small alpha: each client sees few classes;
    large alpha: close to iid.
    """
    owners = np.empty(len(labels), dtype=np.int32)
    classes = np.unique(labels)
    # Dirichlet via normalized gammas; a row whose gammas all underflow to zero falls back to uniform.
    gammas = rng.standard_gamma(alpha, size=(len(classes), num_clients))
    sums = gammas.sum(axis=1, keepdims=True)
    proportions = np.where(sums > 0, gammas / np.where(sums > 0, sums, 1.0), 1.0 / num_clients)
    for c, p in zip(classes, proportions):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        owners[idx] = np.searchsorted(cuts, np.arange(len(idx)), side="right")
    return owners


def partition_owners(
    labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int, min_samples: int = MIN_SAMPLES
) -> np.ndarray:
    """The owner (client id, int32) of every sample under `scheme` (a PARTITIONS key).

    Every client gets at least min(min_samples, len(labels) // num_clients) samples: the shortfall
    is moved from the largest clients, deterministically (so label skew cannot leave a client empty).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    labels = np.asarray(labels)
    owners = PARTITIONS.get(scheme)(labels, num_clients, alpha, np.random.default_rng(seed))
    floor = min(min_samples, len(labels) // num_clients)
    if floor >= 1:
        owners = _ensure_min_samples(owners, num_clients, floor, np.random.default_rng([seed, 1]))
    return owners


def _ensure_min_samples(owners: np.ndarray, num_clients: int, floor: int, rng: np.random.Generator) -> np.ndarray:
    """Move samples from the currently largest clients (ties: lowest id) to clients below `floor`.

    Needs len(owners) >= floor * num_clients, so the surplus above `floor` covers the shortfall
    and a donor always keeps at least floor + 1 before giving.
    """
    counts = np.bincount(owners, minlength=num_clients)
    shortfall = np.maximum(floor - counts, 0)
    total = int(shortfall.sum())
    if total == 0:
        return owners
    heap = [(-int(n), int(c)) for c, n in enumerate(counts) if n > floor]
    heapq.heapify(heap)
    gives = np.zeros(num_clients, dtype=np.int64)
    for _ in range(total):
        negative, client = heapq.heappop(heap)
        gives[client] += 1
        if -negative - 1 > floor:
            heapq.heappush(heap, (negative + 1, client))
    # Each donor gives its first samples in a random (seeded) order.
    order = rng.permutation(len(owners))
    by_owner = order[np.argsort(owners[order], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    donors = np.flatnonzero(gives)
    moved = np.concatenate([by_owner[starts[d] : starts[d] + gives[d]] for d in donors])
    owners = owners.copy()
    owners[moved] = np.repeat(np.arange(num_clients, dtype=np.int32), shortfall)
    return owners


def client_indices(owners: np.ndarray, client_id: int) -> np.ndarray:
    """Sorted sample indices owned by `client_id`."""
    return np.flatnonzero(owners == client_id)


def holdout_size(n: int, fraction: float) -> int:
    """Held-out samples of a client with n: round(fraction * n), at least 1 and at most n - 1; none when n < 2."""
    return min(max(int(round(fraction * n)), 1), n - 1) if n >= 2 else 0


def min_client_size(holdout: float) -> int:
    """The fewest samples that leave a client MIN_TRAIN to train and MIN_HOLDOUT held out (8 at 0.2)."""
    n = MIN_TRAIN + MIN_HOLDOUT
    while holdout_size(n, holdout) < MIN_HOLDOUT or n - holdout_size(n, holdout) < MIN_TRAIN:
        n += 1
    return n


def split_holdout(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's indices into (train, holdout), both sorted; seeded.

    The holdout (for adaptive BN selection and evaluation) gets `holdout_size(n, fraction)` samples.
    """
    n = len(indices)
    n_holdout = holdout_size(n, fraction)
    shuffled = np.asarray(indices)[np.random.default_rng(seed).permutation(n)]
    return np.sort(shuffled[n_holdout:]), np.sort(shuffled[:n_holdout])


@dataclass
class ClientData:
    """One client's local training data and its held-out slice (arrays, not tensors)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray


class GeneratedBundle(DataBundle):
    """A dataset whose clients' data are generated per client (shared.synthetic) rather than cut
    from x_train by a partition; `dataset.partition` and `dataset.alpha` do not apply to it."""

    def client(self, client_id: int, holdout: float) -> ClientData:
        """Client `client_id`'s data and held-out slice."""
        raise NotImplementedError

    def sizes(self, num_clients: int, holdout: float) -> np.ndarray:
        """(train, held-out) counts of clients 0..num_clients-1, shape (num_clients, 2), without generating them."""
        raise NotImplementedError


_OWNERS_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_OWNERS_CACHE_SIZE = 4


def cached_owners(
    labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int, min_samples: int = MIN_SAMPLES
) -> np.ndarray:
    """`partition_owners`, cached in-process per (labels array, num_clients, scheme, alpha, seed, min_samples).

    The cache keeps a reference to `labels`, so its identity cannot be reused while cached. The
    returned array is read-only because it is shared.
    """
    key = (id(labels), len(labels), num_clients, scheme, float(alpha), seed, min_samples)
    hit = _OWNERS_CACHE.get(key)
    if hit is not None and hit[0] is labels:
        return hit[1]
    owners = partition_owners(labels, num_clients, scheme, alpha, seed, min_samples)
    owners.setflags(write=False)
    if len(_OWNERS_CACHE) >= _OWNERS_CACHE_SIZE:
        _OWNERS_CACHE.pop(next(iter(_OWNERS_CACHE)))
    _OWNERS_CACHE[key] = (labels, owners)
    return owners


def client_data(
    bundle: DataBundle,
    num_clients: int,
    client_id: int,
    scheme: str,
    alpha: float,
    holdout: float,
    seed: int,
) -> ClientData:
    """Client `client_id`'s share of the training split, with its held-out slice.

    The partition tops every client up to `min_client_size(holdout)` samples where the data allow.
    """
    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id {client_id} out of range for {num_clients} clients")
    if isinstance(bundle, GeneratedBundle):
        return bundle.client(client_id, holdout)
    owners = cached_owners(bundle.y_train, num_clients, scheme, alpha, seed, min_client_size(holdout))
    holdout_seed = int(np.random.SeedSequence([seed, client_id]).generate_state(1)[0])
    train_idx, holdout_idx = split_holdout(client_indices(owners, client_id), holdout, holdout_seed)
    return ClientData(
        bundle.x_train[train_idx], bundle.y_train[train_idx], bundle.x_train[holdout_idx], bundle.y_train[holdout_idx]
    )


def every_client_data(bundle: DataBundle, config: Config) -> list[ClientData]:
    """`client_data` of every client under a run config's partition, in partition order (the
    centralized ceiling trains on their union; held-out scoring reads their held-out slices)."""
    d = config.dataset
    return [client_data(bundle, config.fl.num_clients, i, d.partition, d.alpha, d.holdout, config.seed)
            for i in range(config.fl.num_clients)]


def client_sizes(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, holdout: float, seed: int) -> np.ndarray:
    """Samples per client under the partition `client_data` cuts (for a check before any run starts)."""
    owners = cached_owners(labels, num_clients, scheme, alpha, seed, min_client_size(holdout))
    return np.bincount(owners, minlength=num_clients)


def server_warmup_set(bundle: DataBundle, shots_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A small labelled set for the server's optional warm-up: `shots_per_class` per class.

    Drawn from the TRAIN split, never the test split (the FedTiny reference code draws it from the
    test set, a leak). A class with fewer samples contributes all of them.
    """
    if shots_per_class < 1:
        raise ValueError(f"shots_per_class must be >= 1, got {shots_per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(bundle.y_train):
        idx = np.flatnonzero(bundle.y_train == c)
        chosen.append(rng.choice(idx, size=min(shots_per_class, len(idx)), replace=False))
    idx = np.sort(np.concatenate(chosen))
    return bundle.x_train[idx], bundle.y_train[idx]


def partition_sizes(bundle: DataBundle, num_clients: int, scheme: str, alpha: float, holdout: float,
                    seed: int) -> list[tuple[int, int]]:
    """(train, held-out) example counts of every partition as `client_data` cuts them, without cutting:
    what a simulation's server knows each virtual client holds (the bound on the counts it reports)."""
    if isinstance(bundle, GeneratedBundle):
        return [(int(t), int(h)) for t, h in bundle.sizes(num_clients, holdout)]
    totals = client_sizes(bundle.y_train, num_clients, scheme, alpha, holdout, seed)
    return [(int(n) - holdout_size(int(n), holdout), holdout_size(int(n), holdout)) for n in totals]
