"""Zhu & Gupta's gradual pruning schedule (arXiv 1710.01878) as a density curve."""

from __future__ import annotations

import pytest

from shared.pruning.schedule import gradual_density


def test_gradual_density_is_initial_up_to_start_and_final_from_end():
    assert gradual_density(0, 10, 50, 0.01) == 1.0
    assert gradual_density(10, 10, 50, 0.01) == 1.0
    assert gradual_density(50, 10, 50, 0.01) == 0.01
    assert gradual_density(80, 10, 50, 0.01) == 0.01


def test_gradual_density_never_increases():
    densities = [gradual_density(t, 5, 45, 0.05, initial_density=0.8) for t in range(60)]
    assert all(a >= b for a, b in zip(densities, densities[1:]))
    assert densities[0] == 0.8 and densities[-1] == 0.05


def test_gradual_density_is_cubic_between_start_and_end():
    # halfway: d_f + (d_i - d_f) / 8; a quarter in: d_f + (d_i - d_f) * (3/4)^3
    assert gradual_density(30, 10, 50, 0.2) == pytest.approx(0.2 + 0.8 / 8)
    assert gradual_density(20, 10, 50, 0.2, initial_density=0.6) == pytest.approx(0.2 + 0.4 * 27 / 64)


def test_gradual_density_with_start_equal_to_end_is_one_step():
    assert [gradual_density(t, 3, 3, 0.1) for t in (2, 3, 4)] == [1.0, 0.1, 0.1]


@pytest.mark.parametrize(("final", "initial"), [(0.5, 0.4), (-0.1, 1.0), (0.1, 1.5)])
def test_gradual_density_rejects_densities_out_of_order_or_range(final, initial):
    with pytest.raises(ValueError, match="final_density"):
        gradual_density(0, 0, 10, final, initial_density=initial)


def test_gradual_density_rejects_end_before_start():
    with pytest.raises(ValueError, match="end must be >= start"):
        gradual_density(0, 10, 5, 0.1)


def test_the_regime_configs_schedule_adjusts_every_block_at_least_twice_before_t_end():
    import math

    from shared.config import CONFIG_DIR, load_config
    from shared.models import build_model, prunable_blocks
    from shared.pruning.schedule import block_for_adjustment, is_adjust_round

    c = load_config(CONFIG_DIR / "fashion-mnist-regime.yaml")
    blocks = prunable_blocks(build_model(c.model.name, 10, (1, 28, 28)))
    t_end = math.floor(c.fedtiny.end_fraction * c.fl.rounds)
    rounds = [t for t in range(1, c.fl.rounds + 1) if is_adjust_round(t, c.fedtiny.adjust_interval, t_end)]
    visits = [tuple(block_for_adjustment(blocks, step)) for step in range(len(rounds))]
    assert not c.pruning.keep_first_dense and len(blocks) == 5
    assert all(visits.count(tuple(b)) >= 2 for b in blocks)
