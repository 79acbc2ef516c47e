"""FedProx's Synthetic(alpha, beta): clients generated on demand, reproducible, heterogeneous as
alpha and beta say, power-law sizes, and no cost that grows with the fleet."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from server.replies import check_count
from shared.config import ConfigError, SyntheticConfig, load_config
from shared.data import DATASETS, load_for
from shared.partition import client_data, partition_sizes
from shared.synthetic import TEST_STREAM, client_model, generate_client, sample_counts

SYNTHETIC = ["dataset.name=synthetic", "model.name=mlp", "pruning.keep_first_dense=false"]


def _config(*overrides: str):
    return load_config(None, SYNTHETIC + list(overrides))


def _client(bundle, num_clients: int, client: int, holdout: float = 0.2):
    return client_data(bundle, num_clients, client, "dirichlet", 0.5, holdout, 0)


def test_it_is_a_registered_dataset_with_held_out_clients_as_test_set():
    assert "synthetic" in DATASETS
    c = _config("dataset.synthetic.test_clients=7")
    bundle = load_for(c)
    x_test = np.concatenate([generate_client(c.dataset.synthetic, c.seed, k, TEST_STREAM)[0] for k in range(7)])
    assert np.array_equal(bundle.x_test, x_test)
    assert bundle.input_shape == (1, 1, 60) and bundle.num_classes == 10
    fleet_rows = {row.tobytes() for k in range(50) for row in generate_client(c.dataset.synthetic, c.seed, k)[0]}
    assert not any(row.tobytes() in fleet_rows for row in bundle.x_test)  # no test sample belongs to a fleet client


def test_same_seed_and_client_give_the_same_data_whatever_the_fleet():
    bundle = load_for(_config())
    a, b = _client(bundle, 10, 7), _client(bundle, 10**6, 7)
    for name in ("x_train", "y_train", "x_holdout", "y_holdout"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    other_seed = load_for(_config("seed=1"))
    assert not np.array_equal(_client(other_seed, 10, 7).x_train[:5], a.x_train[:5])


def test_clients_differ_as_alpha_and_beta_say():
    clients = range(400)
    for alpha in (0.5, 2.0):
        s = SyntheticConfig(alpha=alpha, beta=0.0)
        model_shift = [client_model(s, 0, k).weights.mean() for k in clients]  # mean of W_k is about u_k ~ N(0, alpha)
        assert np.std(model_shift) == pytest.approx(np.hypot(alpha, 1 / np.sqrt(600)), rel=0.15)
    for beta in (0.5, 2.0):
        s = SyntheticConfig(alpha=0.0, beta=beta)
        input_shift = [generate_client(s, 0, k)[0].mean() for k in clients]  # about B_k ~ N(0, beta)
        assert np.std(input_shift) == pytest.approx(np.hypot(beta, 1 / np.sqrt(60)), rel=0.15)
    s = SyntheticConfig()
    x0, x1 = generate_client(s, 0, 0)[0], generate_client(s, 0, 1)[0]
    assert x0.shape[1:] == x1.shape[1:] == (1, 1, 60)
    assert not np.allclose(x0.mean(axis=0), x1.mean(axis=0), atol=0.3)  # each client has its own input mean
    majority = [np.bincount(generate_client(s, 0, k)[1], minlength=10).argmax() for k in range(100)]
    assert len(set(majority)) >= 5  # and its own labelling: the clients' majority classes differ


def test_sample_counts_follow_the_power_law():
    s = SyntheticConfig(min_samples=20, max_samples=2000, power=1.5)
    counts = sample_counts(s, 3, np.arange(200_000))
    assert counts.min() == 20 and counts.max() == 2000
    for m in (40, 100, 400):
        assert np.mean(counts >= m) == pytest.approx((m / 20) ** -1.5, rel=0.05)
    assert np.mean(counts == 2000) == pytest.approx((2000 / 20) ** -1.5, rel=0.15)  # the truncated tail
    below = counts[counts < 1000]
    hill = len(below) / np.log(below / 20).sum()  # the exponent's estimate, truncation aside
    assert hill == pytest.approx(1.5, rel=0.1)
    assert np.array_equal(sample_counts(s, 3, np.arange(5, 10)), counts[5:10])  # one client alone: the same count


def test_the_sizes_the_server_expects_are_the_sizes_a_client_reports():
    bundle = load_for(_config("dataset.holdout=0.3"))
    sizes = partition_sizes(bundle, 100_000, "iid", 0.5, 0.3, 0)
    assert len(sizes) == 100_000
    for k in (0, 1, 99, 4_321, 99_999):
        data = _client(bundle, 100_000, k, holdout=0.3)
        assert sizes[k] == (len(data.y_train), len(data.y_holdout))
        assert min(sizes[k]) >= 2
        assert check_count(len(data.y_train), sizes[k][0]) == (len(data.y_train), None)
        assert check_count(len(data.y_train) + 1, sizes[k][0])[1] is not None  # one more than it holds: rejected


def test_one_client_of_a_million_costs_what_one_of_ten_does():
    bundle = load_for(_config())
    peaks = {}
    for fleet in (10, 10**6, 10):
        tracemalloc.start()
        _client(bundle, fleet, 7)
        peaks[fleet] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[10**6] < 1.2 * peaks[10] + 16_384
    assert peaks[10**6] < 1_000_000  # no array over the fleet (a million int32 would be 4 MB)


@pytest.mark.parametrize("override, why", [
    ("dataset.synthetic.alpha=-1", "'dataset.synthetic.alpha' must be >= 0"),
    ("dataset.synthetic.beta=nan", "'dataset.synthetic.beta' must be a finite number"),
    ("dataset.synthetic.power=0", "'dataset.synthetic.power' must be > 0"),
    ("dataset.synthetic.min_samples=5", "'dataset.synthetic.min_samples' must be at least 8"),
    ("dataset.synthetic.max_samples=10", "'dataset.synthetic.max_samples' must be in \\[min_samples"),
    ("dataset.synthetic.classes=1", "'dataset.synthetic.classes' must be in \\[2, 1000\\]"),
    ("dataset.synthetic.test_clients=10000", "at most 2\\^28"),
    ("dataset.synthetic.dimensions=3", "unknown config key"),
])
def test_bad_settings_are_one_line_naming_the_key(override, why):
    with pytest.raises(ConfigError, match=why):
        _config(override)


def test_settings_reach_the_generator():
    narrow = load_for(_config("dataset.synthetic.dimension=5", "dataset.synthetic.classes=3"))
    assert narrow.input_shape == (1, 1, 5) and narrow.num_classes == 3
    assert _client(narrow, 10, 0).x_train.shape[1:] == (1, 1, 5)


def test_a_fleet_of_a_hundred_thousand_passes_the_checks_before_a_run(tmp_path):
    from simulations.cli.common import preflight

    config_file = Path(__file__).resolve().parent.parent / "configs" / "synthetic.yaml"
    preflight(load_config(config_file, ["fl.num_clients=100000", f"output_dir={tmp_path / 'run'}"]))
