"""The `fedtiny` command line as a new user meets it: checks before any run starts, own code, output."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import load_config
from shared.data import FASHION_MNIST_DIR
from simulations.cli import common, launch
from simulations.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
needs_fashion_mnist = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed")


@pytest.fixture
def no_run(monkeypatch):
    """A run that gets past the checks fails the test: they must stop it before anything starts."""

    def started(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(launch, "simulate", started)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtiny: ") and "\n" not in err
    return err


def test_a_fleet_the_data_cannot_fill_exits_2_before_the_run_naming_what_to_change(capsys, no_run, tmp_path):
    code = cli_main(["run", "fl.num_clients=10000", "fl.clients_per_round=10", f"output_dir={tmp_path}"])
    err = one_line_error(capsys)
    assert code == 2
    assert "9999 of 10000 clients would hold fewer than 8 examples" in err and "1437 training examples" in err
    assert "fl.num_clients to at most 179" in err and "dataset.name=fashion-mnist" in err


@needs_fashion_mnist
def test_the_readme_large_fleet_command_passes_the_checks_and_the_default_holdout_would_not():
    readme = ["fl.num_clients=10000", "fl.clients_per_round=10", "dataset.holdout=0.3"]
    common.preflight(load_config(ROOT / "configs" / "fashion-mnist.yaml", readme))
    with pytest.raises(common.ConfigError, match=r"at most 7500, hold out more \(dataset.holdout=0.3 needs 5\)"):
        common.preflight(load_config(ROOT / "configs" / "fashion-mnist.yaml", readme[:2]))


def test_a_density_below_the_dense_first_layer_exits_2_before_the_run(capsys, no_run, tmp_path):
    code = cli_main(["run", "pruning.density=0.001", f"output_dir={tmp_path}"])
    err = one_line_error(capsys)
    assert code == 2
    assert "keeps 65 of the model's 65056 prunable weights" in err and "all 288 of features.0.weight" in err
    assert "at least 0.0045" in err and "pruning.keep_first_dense=false" in err


def test_the_same_density_passes_without_a_dense_first_layer_and_for_dense_fedavg():
    common.preflight(load_config(overrides=["pruning.density=0.001", "pruning.keep_first_dense=false"]))
    common.preflight(load_config(overrides=["pruning.density=0.001", "method=fedavg"]))


def test_compare_checks_every_cell_before_the_first_one_runs(capsys, no_run, tmp_path):
    code = cli_main(["compare", "--methods", "fedtiny", "--densities", "0.05,0.001", f"output_dir={tmp_path}"])
    assert code == 2 and "0.001 keeps 65" in one_line_error(capsys)
    assert not (tmp_path / "fedtiny-d0.05-s0").exists()
