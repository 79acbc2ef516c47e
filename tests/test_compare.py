"""`fedtiny compare`: the grid, resuming, and the table and plots written from metrics."""

from __future__ import annotations

import csv
import json

import pytest

from shared.config import ConfigError
from simulations.cli import compare, main, paired
from simulations.cli.compare import Cell

TINY = "configs/tiny.yaml"


def _metrics(accuracy: float, ratio: float = 0.1, rounds: int = 3) -> dict:
    per_round = [
        {"round": t, "accuracy": accuracy * t / rounds, "bytes_up": 100, "bytes_down": 200} for t in range(rounds + 1)
    ]
    summary = {
        "accuracy": accuracy, "density": 0.05, "bytes_ratio": ratio, "bytes_up": 400, "bytes_down": 800,
        "flops": {"dense": 1000, "sparse": 50}, "model_size": {"dense_bytes": 4000, "sparse_bytes": 300},
        "wall_seconds": 1.0, "federated_accuracy": accuracy - 0.05,
    }
    return {"rounds": per_round, "summary": summary}


def test_grid_runs_dense_fedavg_once_per_seed():
    cells = compare.grid(["fedtiny", "fedavg"], [0.01, 0.05], [0, 1])
    assert [c.name for c in cells] == [
        "fedtiny-d0.01-s0", "fedtiny-d0.05-s0", "fedavg-d1-s0", "fedtiny-d0.01-s1", "fedtiny-d0.05-s1", "fedavg-d1-s1",
    ]


def test_ablation_names_map_to_fedtiny_switches(tmp_path):
    noabns = compare.cell_config(Cell("fedtiny-noabns", 0.01, 1), tmp_path, TINY, [])
    noprog = compare.cell_config(Cell("fedtiny-noprogressive", 0.05, 0), tmp_path, TINY, [])
    assert (noabns.method, noabns.fedtiny.abns, noabns.fedtiny.progressive) == ("fedtiny", False, True)
    assert (noprog.method, noprog.fedtiny.abns, noprog.fedtiny.progressive) == ("fedtiny", True, False)
    assert (noabns.pruning.density, noabns.seed) == (0.01, 1)
    assert noabns.output_dir == str(tmp_path / "fedtiny-noabns-d0.01-s1")


def test_unknown_method_fails_listing_the_known_ones():
    with pytest.raises(ConfigError, match="unknown method 'lottery'.*fedtiny-noabns"):
        compare.grid(["lottery"], [0.05], [0])


def test_finished_cells_are_not_rerun(tmp_path):
    cells = compare.grid(["snip", "synflow"], [0.05], [0])
    (tmp_path / "snip-d0.05-s0").mkdir()
    (tmp_path / "snip-d0.05-s0" / "metrics.json").write_text(json.dumps(_metrics(0.8)))
    (tmp_path / "synflow-d0.05-s0").mkdir()  # interrupted earlier: a summary without accuracy
    (tmp_path / "synflow-d0.05-s0" / "metrics.json").write_text(json.dumps({"rounds": [], "summary": {"error": "x"}}))
    ran = []

    def simulate(config, run_dir):
        ran.append((config.method, run_dir.name))
        return _metrics(0.7)

    results, failures = compare.run_grid(cells, tmp_path, TINY, [], simulate, log=lambda s: None)
    assert ran == [("synflow", "synflow-d0.05-s0")]
    assert {c.name: m["summary"]["accuracy"] for c, m in results.items()} == {"snip-d0.05-s0": 0.8, "synflow-d0.05-s0": 0.7}
    assert failures == []


def test_a_failed_cell_is_reported_and_the_grid_goes_on(tmp_path):
    cells = compare.grid(["snip", "imp"], [0.05], [0])

    def simulate(config, run_dir):
        if config.method == "snip":
            raise RuntimeError("the run failed: boom")
        return _metrics(0.6)

    results, failures = compare.run_grid(cells, tmp_path, TINY, [], simulate, log=lambda s: None)
    assert [c.name for c in results] == ["imp-d0.05-s0"]
    assert failures == ["snip-d0.05-s0: the run failed: boom"]


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = [compare.row(Cell("snip", 0.05, s), _metrics(a)) for s, a in enumerate((0.6, 0.8))]
    (s,) = compare.summarize(rows)
    assert (s["method"], s["density"], s["seeds"]) == ("snip", 0.05, 2)
    assert s["accuracy"] == pytest.approx(0.7) and s["accuracy_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert s["flops_ratio"] == pytest.approx(0.05) and s["model_bytes"] == 300


def test_outputs_are_written_from_metrics(tmp_path):
    results = {
        Cell("fedavg", 1.0, 0): _metrics(0.9, ratio=1.0),
        Cell("fedtiny", 0.05, 0): _metrics(0.8),
        Cell("fedtiny", 0.05, 1): _metrics(0.6),
        Cell("fedtiny", 0.01, 0): _metrics(0.5),
    }
    paths = compare.write_outputs(results, tmp_path)
    with open(tmp_path / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[1]["method"] == "fedtiny" and float(rows[1]["accuracy"]) == 0.8
    table = (tmp_path / "comparison.md").read_text().splitlines()
    assert table[2].startswith("| 1 | fedavg | 1 | 90.00 ± 0.00 % | 85.00 % | 1.0000 |")
    assert table[3].startswith("| 0.05 | fedtiny | 2 | 70.00 ± 14.14 % | 65.00 % | 0.1000 | 50 (0.050) | 0.3 KiB | 1 |")
    assert table[4].startswith("| 0.01 | fedtiny | 1 | 50.00 ± 0.00 % |")
    for name in ("accuracy_vs_density.png", "accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert tmp_path / name in paths and (tmp_path / name).stat().st_size > 0


def test_report_only_tabulates_the_finished_cells_and_runs_nothing(tmp_path, monkeypatch):
    (tmp_path / "snip-d0.05-s0").mkdir()
    (tmp_path / "snip-d0.05-s0" / "metrics.json").write_text(json.dumps(_metrics(0.8)))
    monkeypatch.setattr("simulations.cli.launch.simulate", lambda *a, **k: pytest.fail("--report-only ran a cell"))
    args = ["compare", "--report-only", "--methods", "snip,synflow", "--densities", "0.05", "--seeds", "0,1",
            "--config", TINY, f"output_dir={tmp_path}"]
    assert main(args) == 0
    with open(tmp_path / "comparison.csv") as f:
        assert [(r["method"], r["seed"]) for r in csv.DictReader(f)] == [("snip", "0")]


def test_report_only_without_a_finished_cell_says_so(tmp_path, capsys):
    args = ["compare", "--report-only", "--methods", "snip", "--densities", "0.05", "--config", TINY,
            f"output_dir={tmp_path}"]
    assert main(args) == 2
    assert "no finished cell" in capsys.readouterr().err


@pytest.mark.integration
def test_compare_runs_two_cells_in_simulation_then_resumes(tmp_path):
    args = ["compare", "--methods", "fedavg,synflow", "--densities", "0.05", "--seeds", "0",
            "--config", TINY, "fl.rounds=1", f"output_dir={tmp_path}"]
    assert main(args) == 0
    with open(tmp_path / "comparison.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["fedavg", "synflow"]
    stamp = (tmp_path / "synflow-d0.05-s0" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0  # everything finished: nothing reruns
    assert (tmp_path / "synflow-d0.05-s0" / "metrics.json").stat().st_mtime_ns == stamp


def test_each_fedtiny_search_is_reported_with_its_pooled_losses(tmp_path):
    searched = _metrics(0.8)
    searched["summary"] |= {"selected": "erk+synflow", "candidates": [
        {"name": "global+magnitude", "abns_loss": 2.21, "loss": 2.37, "stages": [2.37]},
        {"name": "erk+synflow", "abns_loss": 2.26, "loss": 1.00, "stages": [1.40, 1.00]},
    ]}
    compare.write_outputs({Cell("fedtiny", 0.003, 1): searched, Cell("synflow", 0.003, 1): _metrics(0.7)}, tmp_path)
    table = (tmp_path / "comparison.md").read_text()
    assert "| fedtiny-d0.003-s1 | erk+synflow | 2.260 (2 of 2) | 1.400 → 1.000 | global+magnitude |" in table
    assert table.count("-d0.003-s1 |") == 1  # runs without a search have no row
    unsearched = _metrics(0.7)
    unsearched["summary"] |= {"selected": "erk+synflow", "candidates": [{"name": "erk+synflow", "loss": None}]}
    assert compare.search_table({Cell("synflow", 0.003, 1): _metrics(0.7), Cell("fedtiny-noabns", 0.003, 1): unsearched}) == ""


def test_the_centralized_ceiling_is_labelled_as_not_federated():
    rows = [compare.row(Cell("centralized", 0.01, 0), _metrics(0.9))]
    assert "| centralized (ceiling, not federated) |" in compare.markdown(compare.summarize(rows))


def _row(method: str, density: float, seed: int, accuracy: float) -> dict:
    return {"method": method, "density": density, "seed": seed, "accuracy": accuracy}


def test_fedtiny_is_compared_with_each_baseline_seed_by_seed_on_the_seeds_both_ran():
    rows = [
        *(_row("fedtiny", 0.01, s, a) for s, a in enumerate((0.80, 0.82, 0.78))),
        *(_row("synflow", 0.01, s, a) for s, a in enumerate((0.79, 0.83))),  # no seed 2
        *(_row("imp", 0.01, s, a) for s, a in enumerate((0.70, 0.70, 0.70))),
        _row("fedavg", 1.0, 0, 0.9), _row("centralized", 0.01, 0, 0.9), _row("fedtiny-noprogressive", 0.01, 0, 0.9),
        _row("synflow", 0.003, 0, 0.5),  # no FedTiny run at this density
    ]
    diffs = paired.paired_differences(rows, "fedtiny", ["fedavg", "centralized", "fedtiny-noprogressive"])
    assert [(x["density"], x["baseline"], x["seeds"], x["below"]) for x in diffs] == [
        (0.01, "synflow", 2, 1), (0.01, "imp", 3, 0)]  # the stronger baseline first
    synflow, imp = diffs
    assert synflow["mean"] == pytest.approx(0.0, abs=1e-12)
    assert synflow["interval"] == pytest.approx((-0.12706, 0.12706), rel=1e-4)  # t(0.975, 1) x 0.01
    assert imp["mean"] == pytest.approx(0.10) and imp["interval"][0] == pytest.approx(0.10 - 4.3027 * 0.02 / 3 ** 0.5, rel=1e-4)
    assert paired.interval([0.01]) is None


def test_comparison_table_reports_the_paired_differences(tmp_path):
    results = {Cell(m, 0.05, s): _metrics(a) for (m, s), a in
               {("fedtiny", 0): 0.80, ("fedtiny", 1): 0.70, ("snip", 0): 0.75, ("snip", 1): 0.72}.items()}
    compare.write_outputs(results, tmp_path)
    table = (tmp_path / "comparison.md").read_text()
    assert "| 0.05 | snip | 2 | +1.50 | [-42.97, +45.97] | 1 of 2 |" in table
    compare.write_outputs(results, tmp_path, focus="snip")
    assert "| 0.05 | fedtiny | 2 | -1.50 |" in (tmp_path / "comparison.md").read_text()


def test_an_unknown_focus_method_fails_before_any_cell_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("simulations.cli.launch.simulate", lambda *a, **k: pytest.fail("a cell ran"))
    args = ["compare", "--methods", "snip", "--focus", "fedtinny", "--densities", "0.05", "--config", TINY,
            f"output_dir={tmp_path}"]
    assert main(args) == 2
    assert "unknown method 'fedtinny' in --focus" in capsys.readouterr().err
