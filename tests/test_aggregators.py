"""Aggregators are a registry (`shared.aggregate.AGGREGATORS`): `fl.aggregator` names a built-in one
or a user's `package.module:fn` from a trusted package, and a typo fails in one line."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_config
from shared.aggregate import AGGREGATORS, combine
from shared.config import ConfigError


def test_the_built_in_aggregators_are_registered():
    assert AGGREGATORS.names() == ["mean", "median", "trimmed-mean"]


def test_an_unknown_aggregator_is_one_config_line(tmp_path):
    with pytest.raises(ConfigError, match="'fl.aggregator': unknown aggregator 'meen'; known: mean, median, trimmed-mean"):
        tiny_config(tmp_path, "fl.aggregator=meen")


def test_a_users_aggregator_runs_from_a_trusted_package(tmp_path, monkeypatch):
    (tmp_path / "myagg.py").write_text(
        "import torch\n\ndef largest(values, weights, trim_fraction):\n    return torch.stack(values).amax(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    states = [{"w": torch.tensor([1.0, 5.0]), "n": torch.tensor(2)}, {"w": torch.tensor([3.0, 2.0]), "n": torch.tensor(4)}]
    out = combine(states, [1, 1], {"w": torch.tensor([True, False])}, "myagg:largest", trusted=["myagg"])
    assert out["w"].tolist() == [3.0, 0.0] and out["n"].item() == 4
    assert tiny_config(tmp_path, "fl.aggregator=myagg:largest", "trusted=[myagg]").fl.aggregator == "myagg:largest"
    with pytest.raises(ConfigError, match="not trusted"):
        tiny_config(tmp_path, "fl.aggregator=myagg:largest")
