"""Config: YAML -> typed dataclasses, validated once, with one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shared.config import Config, ConfigError, from_flat, load_config, to_flat
from simulations.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_matches_dataclass_defaults():
    assert load_config() == Config()


def test_pyproject_flower_config_mirrors_defaults():
    flower = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert _flatten(flower) == to_flat(Config())


def _flatten(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_overrides_and_file_layer(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("fl:\n  rounds: 7\n")
    c = load_config(f, ["pruning.density=0.01", "fedtiny.allocations=[erk,lamp]"])
    assert (c.fl.rounds, c.pruning.density, c.fedtiny.allocations) == (7, 0.01, ["erk", "lamp"])


@pytest.mark.parametrize("spelling", ["fedtiny.scores=magnitude,synflow", "fedtiny.scores=[magnitude,synflow]"])
def test_a_list_key_takes_a_comma_list_with_or_without_brackets(spelling):
    assert load_config(overrides=[spelling]).fedtiny.scores == ["magnitude", "synflow"]
    assert load_config(overrides=["trusted=mypkg"]).trusted == ["mypkg"]
    assert load_config(overrides=["trusted="]).trusted == []


def test_flat_round_trip_keeps_lists():
    c = load_config(overrides=["fedtiny.allocations=[erk,global]", "fl.rounds=4"])
    assert from_flat(to_flat(c)) == c


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("pruning.densty=0.1", "unknown config key 'pruning.densty'"),
        ("fl.rounds=many", "fl.rounds"),
        ("pruning.density=0", "'pruning.density' must be in (0, 1]"),
        ("pruning.density=1.5", "'pruning.density' must be in (0, 1]"),
        ("fl.clients_per_round=50", "'fl.clients_per_round' must be in [1, fl.num_clients]"),
        ("method=magic", "'method' must be one of"),
        ("fedtiny.allocations=[nope]", "unknown allocation 'nope'"),
        ("fedtiny.scores=[nope]", "unknown score 'nope'"),
        ("dataset.partition=shards", "'dataset.partition' must be iid or dirichlet"),
        ("simulation.fail_mode=explode", "'simulation.fail_mode' must be one of crash, straggle"),
        ("simulation.cpus_per_client=0.5", "simulation.cpus_per_client"),
        ("simulation.cpus_per_client=0", "raise simulation.num_cpus"),
        ("fl.sampling_seed=-2", "'fl.sampling_seed' must be >= 0, or -1"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_cli_exits_2_with_one_line_on_bad_config(capsys):
    assert cli_main(["run", "pruning.density=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtiny: ") and "pruning.density" in err and "\n" not in err


def test_cli_exits_2_on_missing_dataset_path(capsys, tmp_path):
    code = cli_main(["run", "dataset.name=fashion-mnist", f"dataset.path={tmp_path / 'none'}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "dataset.path" in err and "\n" not in err


@pytest.mark.parametrize(
    "override, suggestion",
    [("fl.round=5", "did you mean 'fl.rounds'"), ("seeed=1", "did you mean 'seed'"), ("fedtiny.alfa=0.1", "did you mean 'fedtiny.alpha'")],
)
def test_an_unknown_key_suggests_the_closest_valid_one(override, suggestion):
    with pytest.raises(ConfigError, match=suggestion):
        load_config(overrides=[override])


def test_client_counts_follow_a_small_fleet_unless_set():
    c = load_config(overrides=["fl.num_clients=4"])
    assert (c.fl.clients_per_round, c.fedtiny.search_clients, c.snip.clients) == (4, 4, 4)
    with pytest.raises(ConfigError, match="fl.clients_per_round"):
        load_config(overrides=["fl.num_clients=4", "fl.clients_per_round=5"])


def test_cli_takes_flags_anywhere_among_overrides_and_prints_the_resolved_config(capsys):
    assert cli_main(["config", "fl.rounds=2", "--config", str(ROOT / "configs" / "tiny.yaml"), "fl.num_clients=3"]) == 0
    printed = capsys.readouterr().out
    assert "rounds: 2" in printed and "num_clients: 3" in printed and "clients_per_round: 2" in printed


def test_cli_version_and_stray_arguments(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("fedtiny ")
    with pytest.raises(SystemExit) as done:
        cli_main(["config", "--bogus"])
    assert done.value.code == 2


def test_ctrl_c_during_a_run_is_one_line_naming_the_resume_command(capsys, monkeypatch, tmp_path):
    from simulations.cli import launch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "simulate", interrupted)
    (tmp_path / "checkpoint.json").write_text("{}")  # a round finished before the interruption
    assert cli_main(["run", f"output_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"fedtiny: interrupted; continue from the last checkpoint with: fedtiny run --resume {tmp_path}"


def test_ctrl_c_before_the_first_checkpoint_suggests_no_resume(capsys, monkeypatch, tmp_path):
    from simulations.cli import launch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "simulate", interrupted)
    assert cli_main(["run", f"output_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "fedtiny: interrupted before the first round's checkpoint; nothing to resume, start the run again"


def test_sigterm_during_a_run_stops_it_like_ctrl_c(capsys, monkeypatch, tmp_path):
    import os
    import signal
    import time

    from simulations.cli import launch

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(launch, "simulate", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    (tmp_path / "checkpoint.json").write_text("{}")
    assert cli_main(["run", f"output_dir={tmp_path}"]) == 130
    assert "fedtiny run --resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize("text, why", [("- a\n- b\n", "holds a YAML list, not a mapping"), ("", "is empty")])
def test_a_config_file_that_is_not_a_mapping_is_one_line(tmp_path, text, why):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=why):
        load_config(path)


@pytest.mark.parametrize("override", ["fl.lr=inf", "dataset.alpha=inf", "fl.round_timeout=inf", "fedtiny.alpha=nan",
                                      "model.width=inf", "fl.clip_multiple=nan"])
def test_every_float_setting_must_be_finite(override):
    with pytest.raises(ConfigError, match=f"'{override.partition('=')[0]}' must"):
        load_config(None, [override])


@pytest.mark.parametrize("override, why", [("model.width=1e9", "must be in \\(0, 16.0\\]"),
                                           ("simulation.num_cpus=1000000", "must be in \\[1, 4096\\]")])
def test_sizes_are_bounded_sanely(override, why):
    with pytest.raises(ConfigError, match=why):
        load_config(None, [override])


def test_an_output_dir_under_a_regular_file_is_refused_before_the_run(tmp_path):
    from simulations.cli.common import check_output_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, so .* cannot be a folder"):
        check_output_dir(load_config(None, [f"output_dir={tmp_path / 'file' / 'run'}"]))
    check_output_dir(load_config(None, [f"output_dir={tmp_path / 'new' / 'run'}"]))  # creatable: fine


@pytest.mark.parametrize("override, why", [
    ("fl.round_timeout=1e300", r"'fl.round_timeout' must be in \[0, 604,800\]"),
    ("fl.lr=1e308", r"'fl.lr' must be in \[0, 10\]"),
    ("fl.rounds=100000000000", r"'fl.rounds' must be in \[1, 100,000\]"),
    ("fl.batch_size=1000000000000", r"'fl.batch_size' must be in \[1, 65,536\]"),
    ("fl.local_epochs=1000000", r"'fl.local_epochs' must be in \[1, 1,000\]"),
    ("seed=-1", r"'seed' must be in \[0, 4,294,967,295\]"),
    ("fedtiny.alpha=1e300", r"'fedtiny.alpha' must be in \[-1,000,000,000, 1,000,000,000\]"),
    ("output_dir=" + "a" * 100_000, "'output_dir' must be a path of at most 4096 characters"),
])
def test_finite_but_absurd_values_are_refused_in_one_short_line(override, why):
    with pytest.raises(ConfigError, match=why) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_every_shipped_config_is_within_the_bounds():
    from shared.config import CONFIG_DIR

    for path in CONFIG_DIR.glob("*.yaml"):
        load_config(path)
