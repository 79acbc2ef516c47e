"""The worked example of docs/own-method.md runs as a user's method, from one file, and the guide shows it as it is."""

from __future__ import annotations

import pytest
import torch

from example_method import RandomRegrowth, check_moved
from fake_grid import FakeGrid
from helpers import run_context, tiny_config
from server.loop import run_training
from shared import methods
from shared.config import ConfigError, from_flat, to_flat

SPEC = "example_method:RandomRegrowth"


def test_a_users_method_needs_its_package_trusted(tmp_path):
    with pytest.raises(ConfigError, match=r"not trusted.*trusted=\[example_method\]"):
        tiny_config(tmp_path, f"method={SPEC}")


def test_its_settings_are_a_config_section_validated_in_one_line(tmp_path):
    config = tiny_config(tmp_path, f"method={SPEC}", "trusted=[example_method]", "regrow.fraction=0.5")
    assert methods.load(config.method, config.trusted) is RandomRegrowth and config.regrow.fraction == 0.5
    with pytest.raises(ConfigError, match="'regrow.fraction' must be in"):
        tiny_config(tmp_path, f"method={SPEC}", "trusted=[example_method]", "regrow.fraction=2")


def test_two_rounds_regrow_the_layer_that_moved_most_at_exact_counts(tmp_path):
    config = tiny_config(tmp_path, f"method={SPEC}", "trusted=[example_method]", "fl.rounds=2")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = methods.load(config.method, config.trusted)(ctx)
    start = method.prepare(ctx).masks
    gm = run_training(ctx, method)
    assert len(method.regrown) == 2 and ctx.rejected == 0
    assert {n: int(m.sum()) for n, m in gm.masks.items()} == {n: int(m.sum()) for n, m in start.items()}
    assert any(not torch.equal(gm.masks[n], start[n]) for n in method.regrown)


def test_a_bad_movement_report_is_refused():
    masks = {"w": torch.ones(2, dtype=torch.bool)}
    assert "undecodable" in check_moved(b"garbage", masks)
    from shared import codec

    assert "finite" in check_moved(codec.encode({"w": torch.tensor([float("nan")])}), masks)
    assert check_moved(codec.encode({"w": torch.tensor([0.5])}), masks) == {"w": 0.5}


def test_a_users_section_belongs_only_to_configs_that_name_its_method(tmp_path):
    tiny_config(tmp_path, f"method={SPEC}", "trusted=[example_method]")  # registers the section
    plain = tiny_config(tmp_path)
    assert "regrow" not in plain.sections and to_flat(plain)["user_sections"] == ""
    assert from_flat(to_flat(plain)) == plain


def test_the_guide_shows_this_example_exactly():
    from helpers import ROOT

    guide = (ROOT / "docs" / "own-method.md").read_text()
    shown = guide.split("## The example, in full\n\n```python\n", 1)[1].split("```\n", 1)[0]
    assert shown == (ROOT / "tests" / "example_method.py").read_text()
