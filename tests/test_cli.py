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


class FakeFlower:
    """What `follow` reads from `flwr run --stream`: lines of output, then an exit."""

    def __init__(self, lines: list[str]) -> None:
        self.stdout = iter(lines)

    def wait(self) -> int:
        return 0


STREAM = [
    "INFO : Starting\n",
    "[fedtiny] output directory /tmp/x\n",
    "\x1b[92m[fedtiny] round 0/2 phase=search clients=4\x1b[0m\n",
    "[fedtiny] round 1/2 phase=train clients=2\n",
]


def test_off_a_terminal_the_progress_is_whole_lines_without_a_bar(capsys, tmp_path):
    with open(tmp_path / "run.log", "w") as log:
        launch.follow(FakeFlower(STREAM), log, rounds=2, progress=True, echo=True, live=False)
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "[fedtiny] output directory /tmp/x", "[fedtiny] round 0/2 phase=search clients=4", "[fedtiny] round 1/2 phase=train clients=2",
    ]
    assert "\r" not in out + err and err == ""
    assert (tmp_path / "run.log").read_text() == "".join(STREAM).replace("\x1b[92m", "").replace("\x1b[0m", "")
    assert "\x1b" not in (tmp_path / "run.log").read_text()


def test_on_a_terminal_a_bar_counts_the_rounds(capsys, tmp_path):
    with open(tmp_path / "run.log", "w") as log:
        launch.follow(FakeFlower(STREAM), log, rounds=2, progress=True, echo=True, live=True)
    err = capsys.readouterr().err
    assert "\r" in err and "1/2" in err


def test_the_final_line_names_the_runs_duration_apart_from_the_commands(capsys, tmp_path):
    summary = {"accuracy": 0.9, "density": 0.05, "bytes_ratio": 0.05, "wall_seconds": 52.14}
    common.print_summary({"summary": summary}, tmp_path, total_seconds=71.0)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"accuracy=0.9000 density=0.0500 bytes_ratio=0.0500 wall_seconds=52.1 total_seconds=71.0 outputs={tmp_path}"
    )


def test_the_summary_says_where_the_results_are_and_what_they_say(capsys, tmp_path):
    summary = {"accuracy": 0.975, "federated_accuracy": 0.9389, "density": 0.05, "bytes_ratio": 0.0543,
               "bytes_up": 5_000_000, "bytes_down": 6_700_000, "dense_bytes_up": 100_000_000,
               "dense_bytes_down": 115_000_000, "wall_seconds": 52.1, "selected": "lamp+magnitude"}
    for name in ("accuracy.png", "bytes.png", "events.out.tfevents.1.host"):
        (tmp_path / name).write_bytes(b"x")
    common.print_summary({"summary": summary}, tmp_path)
    out = capsys.readouterr().out
    assert f"outputs      {tmp_path}" in out
    assert "97.50% central test, 93.89% federated" in out
    assert "0.0543 of dense FedAvg (11.7 MB against 215 MB, both ways)" in out
    assert "lamp+magnitude (selected by the pruning policy search)" in out
    assert "accuracy.png, bytes.png" in out and f"tensorboard --logdir {tmp_path}" in out


def test_no_tensorboard_line_when_the_run_wrote_no_event_files(capsys, tmp_path):
    summary = {"accuracy": 0.9, "density": 0.05, "bytes_ratio": 0.05, "wall_seconds": 1.0}
    common.print_summary({"summary": summary}, tmp_path)
    assert "TensorBoard" not in capsys.readouterr().out


def test_flowers_home_with_its_copy_of_the_app_is_gone_after_the_run():
    with launch.flower_home() as home:
        (home / "apps").mkdir()
        assert home.is_dir()
    assert not home.exists()


def test_the_search_round_line_counts_the_clients_it_used(tmp_path, capsys):
    from simulations.inprocess import run_in_process

    config = load_config(ROOT / "configs" / "tiny.yaml", ["fl.rounds=1", "warmup.epochs=0", "fedtiny.scores=magnitude"])
    metrics, _ = run_in_process(config, tmp_path)
    search = metrics["rounds"][0]
    assert search["phase"] == "search" and 2 <= search["clients"] <= 4  # fedtiny.search_clients=2, maybe resampled
    assert "round 0/1 phase=search" in capsys.readouterr().out
    assert metrics["rounds"][1]["dense_bytes"] > 0 and search["dense_bytes"] == 0  # the search is not billed to dense


USER_MODEL = '''
from torch import nn


def tiny_mlp(num_classes, input_shape, width=1.0):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 64), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, num_classes))
'''
USER_DATA = '''
import numpy as np
from sklearn.datasets import load_digits


def my_data(seed, test_fraction):
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * (1 - test_fraction))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
'''


@pytest.mark.integration
def test_the_readme_recipe_runs_a_users_model_and_data_from_the_current_directory(tmp_path, monkeypatch):
    import sys

    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "models.py").write_text(USER_MODEL)
    (tmp_path / "mypkg" / "data.py").write_text(USER_DATA)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    out = tmp_path / "run"
    args = ["run", "--no-progress", "model.name=mypkg.models:tiny_mlp", "dataset.name=mypkg.data:my_data",
            "trusted=mypkg", "pruning.keep_first_dense=false", "fl.rounds=2", "fl.num_clients=4", f"output_dir={out}"]
    assert cli_main(args) == 0
    assert (out / "metrics.json").exists() and not (out / ".flwr").exists()


@pytest.mark.parametrize("overrides, why", [
    (["model.name=.os:system", "trusted=['']"], "is not package.module:name"),
    (["model.name=json.__init__:loads", "trusted=[json]"], "model 'json.__init__:loads' failed: TypeError"),
    (["dataset.name=json:loads", "trusted=[json]"], "dataset 'json:loads' failed: TypeError"),
    (["output_dir=/tmp/" + "a" * 300], "'output_dir' must be a path"),
])
def test_names_and_paths_that_ended_in_a_traceback_are_one_line_and_exit_2(capsys, no_run, overrides, why):
    assert cli_main(["run", *overrides]) == 2
    assert why in one_line_error(capsys)


def test_an_output_dir_the_file_system_cannot_hold_is_one_line(tmp_path):
    from shared.config import Config

    with pytest.raises(common.ConfigError, match="cannot be a folder here"):
        common.check_output_dir(Config(output_dir=str(tmp_path) + ("/" + "a" * 250) * 17))  # over PATH_MAX
