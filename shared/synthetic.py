"""FedProx's Synthetic(alpha, beta): each client's data generated on demand from (run seed, client id).

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020 (arXiv 1812.06127),
Section 5.1, whose generator the LEAF benchmark ships (Caldas et al., arXiv 1812.01097). Client k
has its own softmax regression, y = argmax softmax(W_k x + b_k) with x in R^d, W_k in R^(C x d),
b_k in R^C. Every entry of W_k and b_k is N(u_k, 1) with u_k ~ N(0, alpha): alpha sets how much the
clients' models differ. x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^-1.2, and every entry
of v_k is N(B_k, 1) with B_k ~ N(0, beta): beta sets how much their inputs differ. As in the
reference code, alpha and beta are standard deviations. The shift u_k moves every class's logit
alike (by u_k (sum(x) + 1)), so labels come from each client's own N(0, 1) deviations in W_k and
b_k: clients label alike only by chance, whatever alpha, and a global model scores near chance on
clients it never saw (the test set). The data set is made to stress heterogeneity and scale, not
to rank methods by accuracy; the federated accuracy (on the sampled clients' own held-out slices)
says how well one model fits the clients it trains on.

The paper says only that client sizes follow a power law; here a client holds
n_k = min(max_samples, floor(min_samples * U_k^(-1/power))) samples with U_k uniform in (0, 1], so
P(n_k >= m) = (m / min_samples)^-power for min_samples <= m <= max_samples (a Pareto tail).

Nothing is materialised for the fleet: client k's data depend only on (seed, k), never on
fl.num_clients, and cost O(n_k * d) to generate; all clients' sizes (what a simulation's server
bounds reported counts by) come from a counter-based hash of (seed, k), O(1) memory per client.

The test set is the data of `test_clients` held-out clients: clients 0..test_clients-1 of a
separate seed stream, generated exactly like the fleet's, so none of them is in any fleet and the
test set does not change with the fleet size. The bundle's x_train/y_train hold fleet clients
0..test_clients-1 (all of each), a sample of the training population for the server's warm-up
set; every client's own data come from `SyntheticBundle.client`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from shared.bundle import DATASETS
from shared.config_schema import SyntheticConfig
from shared.partition import ClientData, GeneratedBundle, holdout_size, split_holdout

FLEET_STREAM, TEST_STREAM = 0, 1  # seed streams: the fleet's clients, the held-out test clients
SIZE_DRAW, DATA_DRAW, HOLDOUT_DRAW = 0, 1, 2  # what a stream's seed is drawn for
COVARIANCE_POWER = -1.2  # Sigma_jj = j^-1.2 (FedProx, Sec 5.1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al., OOPSLA 2014), elementwise on uint64 (wrapping)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(seed: int, stream: int, draw: int) -> np.uint64:
    return np.random.SeedSequence([seed, stream, draw]).generate_state(1, np.uint64)[0]


def sample_counts(settings: SyntheticConfig, seed: int, clients: np.ndarray, stream: int = FLEET_STREAM) -> np.ndarray:
    """Samples held by each of `clients` (int ids): the truncated power law, one uniform per (seed, id)."""
    ids = np.asarray(clients, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(_key(seed, stream, SIZE_DRAW) + (ids + np.uint64(1)) * _GOLDEN)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1]
    counts = np.floor(settings.min_samples * uniform ** (-1.0 / settings.power))
    return np.minimum(counts, settings.max_samples).astype(np.int64)


@dataclass(frozen=True)
class ClientModel:
    """What makes a client differ: its softmax regression (weights (d, C), bias (C,)) and its input mean (d,)."""

    weights: np.ndarray
    bias: np.ndarray
    mean: np.ndarray


def _client_rng(seed: int, stream: int, client: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, DATA_DRAW, client])


def _draw_model(settings: SyntheticConfig, rng: np.random.Generator) -> ClientModel:
    s = settings
    u, b_shift = rng.normal(0.0, s.alpha), rng.normal(0.0, s.beta)
    weights = rng.normal(u, 1.0, (s.dimension, s.classes))
    bias = rng.normal(u, 1.0, s.classes)
    return ClientModel(weights, bias, rng.normal(b_shift, 1.0, s.dimension))


def client_model(settings: SyntheticConfig, seed: int, client: int, stream: int = FLEET_STREAM) -> ClientModel:
    """Client `client`'s model and input mean, the first draws of its seed (`generate_client` draws them alike)."""
    return _draw_model(settings, _client_rng(seed, stream, client))


def generate_client(settings: SyntheticConfig, seed: int, client: int, stream: int = FLEET_STREAM
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Client `client`'s inputs (n, 1, 1, d) float32 and labels (n,) int64, from (seed, stream, client) alone."""
    s = settings
    n = int(sample_counts(s, seed, np.array([client]), stream)[0])
    rng = _client_rng(seed, stream, client)
    model = _draw_model(s, rng)
    scale = np.arange(1, s.dimension + 1, dtype=np.float64) ** (COVARIANCE_POWER / 2)  # sqrt(Sigma_jj)
    x = model.mean + rng.standard_normal((n, s.dimension)) * scale
    y = np.argmax(x @ model.weights + model.bias, axis=1)  # softmax is monotone: its argmax is the logits'
    return x.astype(np.float32).reshape(n, 1, 1, s.dimension), y.astype(np.int64)


def _clients(settings: SyntheticConfig, seed: int, count: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [generate_client(settings, seed, k, stream) for k in range(count)]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


@dataclass(frozen=True, eq=False)
class SyntheticBundle(GeneratedBundle):
    """Synthetic(alpha, beta) as a DataBundle whose clients are generated on demand (see the module)."""

    settings: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    seed: int = 0

    def client(self, client_id: int, holdout: float) -> ClientData:
        x, y = generate_client(self.settings, self.seed, client_id)
        holdout_seed = int(np.random.SeedSequence([self.seed, FLEET_STREAM, HOLDOUT_DRAW, client_id]).generate_state(1)[0])
        train, held = split_holdout(np.arange(len(y)), holdout, holdout_seed)
        return ClientData(x[train], y[train], x[held], y[held])

    def sizes(self, num_clients: int, holdout: float) -> np.ndarray:
        counts = sample_counts(self.settings, self.seed, np.arange(num_clients))
        values, which = np.unique(counts, return_inverse=True)  # at most max_samples distinct counts
        held = np.array([holdout_size(int(n), holdout) for n in values])[which]
        return np.stack([counts - held, held], axis=1)


@DATASETS.register("synthetic")
def load_synthetic(path: str, seed: int, test_fraction: float, **settings: object) -> SyntheticBundle:
    """FedProx's Synthetic(alpha, beta) with `settings` (dataset.synthetic); `path` and `test_fraction`
    are unused: the test set is `test_clients` held-out clients."""
    s = SyntheticConfig(**settings)
    x_train, y_train = _clients(s, seed, s.test_clients, FLEET_STREAM)
    x_test, y_test = _clients(s, seed, s.test_clients, TEST_STREAM)
    return SyntheticBundle(x_train, y_train, x_test, y_test, s.classes, (0.0,), (1.0,), settings=s, seed=seed)
