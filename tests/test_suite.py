"""Result suites: the suite files, the runner (skips, resumes, fails early), provenance, and the page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from server.recorder import Recorder
from shared.config import ConfigError
from simulations import provenance
from simulations.cli import main, suite, suite_page
from simulations.cli.common import EXIT_INTERRUPTED
from simulations.cli.compare import Cell
from simulations.inprocess import run_in_process

PROVENANCE = {"commit", "clean", "code", "config_hash", "torch", "flwr", "ray", "cores", "device", "jobs", "attempts",
              "start", "end"}


def _suite_file(tmp_path: Path, methods: dict, densities=(0.05,), name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"config": "configs/tiny.yaml", "densities": list(densities), "methods": methods}))
    return path


def _in_process(config, run_dir, progress=True, echo=True) -> dict:
    return run_in_process(config, run_dir)[0]


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """Results, pages and run folders under tmp_path; cells run in this process (simulations.inprocess)."""
    monkeypatch.setattr(suite, "ROOT", tmp_path / "root")
    monkeypatch.setattr("simulations.cli.launch.simulate", _in_process)
    return tmp_path / "root"


def test_the_suite_files_load_with_their_seed_counts():
    regime = suite.load("regime")
    assert regime.config == "configs/fashion-mnist-regime.yaml" and regime.densities == (0.01, 0.003)
    seeds = regime.seeds
    assert seeds[("fedavg", 1.0)] == 2 and ("fedavg", 0.01) not in seeds  # dense, once per seed
    assert seeds[("fedtiny", 0.01)] == seeds[("fedtiny", 0.003)] == 5 and seeds[("synflow", 0.003)] == 5
    assert (seeds[("imp", 0.01)], seeds[("imp", 0.003)], seeds[("snip", 0.01)]) == (5, 3, 2)
    assert {"sparsyfed", "fedmef", "fedrts", "centralized", "fedtiny-noabns"} <= {m for m, _ in seeds}
    assert len(regime.cells()) == sum(seeds.values())
    default = suite.load("default")
    assert [c.name for c in default.cells()] == [
        "fedtiny-d0.05-s0", "fedavg-d1-s0", "fedtiny-d0.05-s1", "fedavg-d1-s1", "fedtiny-d0.05-s2", "fedavg-d1-s2"]


@pytest.mark.parametrize("raw, message", [
    ([1, 2], "needs keys config, densities and methods"),
    ({"config": "configs/tiny.yaml", "densities": [0.05]}, "needs keys"),
    ({"config": "configs/tiny.yaml", "densities": [0.05], "methods": {"snip": 1}, "seed": 3}, "needs keys"),
    ({"config": "/etc/passwd-nope.yaml", "densities": [0.05], "methods": {"snip": 1}}, "is not a file"),
    ({"config": "../../../etc/hostname", "densities": [0.05], "methods": {"snip": 1}}, "not a file under the project"),
    ({"config": "configs/tiny.yaml", "densities": [0], "methods": {"snip": 1}}, "densities must be"),
    ({"config": "configs/tiny.yaml", "densities": [0.05], "methods": {"snip": {0.5: 2}}}, "name densities"),
    ({"config": "configs/tiny.yaml", "densities": [0.05], "methods": {"snip": 0}}, "seeds of snip at 0.05 must be"),
    ({"config": "configs/tiny.yaml", "densities": [0.05], "methods": {"snip": True}}, "must be a whole number"),
    ({"config": "configs/tiny.yaml", "densities": [0.05], "methods": {"../x": 1}}, "is not a name"),
    ({"config": "configs/tiny.yaml", "densities": [0.05], "methods": {"snip": 1}, "focus": "imp"}, "focus 'imp'"),
])
def test_a_bad_suite_file_is_refused_with_one_line(raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        suite.parse("bad", raw)
    assert "\n" not in str(info.value)


def test_an_unknown_suite_names_the_known_ones(capsys):
    assert main(["compare", "--suite", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no file" in err and "default, regime" in err


def test_an_unregistered_method_fails_before_any_cell_runs(tmp_path, root, monkeypatch, capsys):
    monkeypatch.setattr(suite, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    path = _suite_file(tmp_path, {"fedavg": 1, "nosuchmethod": 1})
    assert main(["compare", "--suite", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'nosuchmethod' in suite tiny" in err
    assert not (root / "outputs").exists()

    def run_cell(cell, config, paths, simulate, jobs):  # the known methods' cells run when a filter leaves the rest out
        assert cell.method == "fedavg"
        paths.cells.mkdir(parents=True, exist_ok=True)
        paths.cell(cell).write_text(json.dumps(_fixture_metrics(0.9, "a")))

    monkeypatch.setattr(suite, "run_cell", run_cell)
    assert main(["compare", "--suite", str(path), "--methods", "fedavg"]) == 0
    assert "`nosuchmethod-d0.05-s0`" in (root / "docs" / "results" / "tiny.md").read_text()


def test_runner_writes_cells_with_provenance_then_skips_them(tmp_path, root, monkeypatch):
    path = _suite_file(tmp_path, {"fedtiny": 1, "fedavg": 1})
    assert main(["compare", "--suite", str(path)]) == 0
    cells = suite.Paths(root, "tiny").cells
    assert sorted(p.name for p in cells.iterdir()) == ["fedavg-d1-s0.json", "fedtiny-d0.05-s0.json"]
    git = provenance.git_state()
    for cell in cells.iterdir():
        record = json.loads(cell.read_text())
        p = record["provenance"]
        assert PROVENANCE <= set(p) and len(p["commit"]) == 40 and p["commit"] == git["commit"]
        assert isinstance(p["clean"], bool) and p["code"] == git["code"] and len(p["config_hash"]) == 16
        assert p["device"].startswith("cpu") and p["cores"] >= 1 and p["start"] <= p["end"]
        assert record["summary"]["accuracy"] > 0 and len(record["rounds"]) == 4
    hashes = {json.loads(c.read_text())["provenance"]["config_hash"] for c in cells.iterdir()}
    assert len(hashes) == 2  # the method and density are part of the merged config
    page = (root / "docs" / "results" / "tiny.md").read_text()
    assert "| 0.05 | fedtiny | 1 |" in page and "| 1 | fedavg | 1 |" in page and "Cells: 2 of 2 finished" in page
    monkeypatch.setattr("simulations.cli.launch.simulate", lambda *a, **k: pytest.fail("a finished cell reran"))
    stamps = {c.name: c.stat().st_mtime_ns for c in cells.iterdir()}
    assert main(["compare", "--suite", str(path)]) == 0
    assert {c.name: c.stat().st_mtime_ns for c in cells.iterdir()} == stamps


def test_an_interrupted_cell_resumes_from_its_checkpoint(tmp_path, root, monkeypatch, capsys):
    path = _suite_file(tmp_path, {"fedtiny": 1})
    paths = suite.Paths(root, "tiny")
    cell = Cell("fedtiny", 0.05, 0)
    whole = suite.configs(suite.load(str(path)), paths, [cell])[cell]
    add = Recorder.add

    def interrupt_at_round_2(self, record):
        if record.round == 2:
            raise KeyboardInterrupt
        add(self, record)

    monkeypatch.setattr(Recorder, "add", interrupt_at_round_2)
    assert main(["compare", "--suite", str(path)]) == EXIT_INTERRUPTED
    assert f"continue the suite (finished cells are skipped) with: fedtiny compare --suite {path}" in capsys.readouterr().err
    assert suite.read_cell(paths.cell(cell)) is None  # not finished: no record
    first = json.loads((paths.work / cell.name / suite.START_FILE).read_text())
    monkeypatch.setattr(Recorder, "add", add)
    capsys.readouterr()
    assert main(["compare", "--suite", str(path)]) == 0
    assert "resumed after round 1" in capsys.readouterr().out
    record = suite.read_cell(paths.cell(cell))
    assert record["provenance"]["attempts"] == 2 and record["provenance"]["start"] == first["start"]
    uninterrupted, _ = run_in_process(whole, tmp_path / "whole")
    assert [r["accuracy"] for r in record["rounds"]] == [r["accuracy"] for r in uninterrupted["rounds"]]


def test_a_partial_cell_of_other_code_starts_again(tmp_path):
    paths = suite.Paths(tmp_path, "tiny")
    cell = Cell("fedavg", 1.0, 0)
    s = suite.parse("tiny", yaml.safe_load(_suite_file(tmp_path, {"fedavg": 1}).read_text()))
    run_dir = paths.work / cell.name
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.json").write_text("{}")
    (run_dir / suite.START_FILE).write_text(json.dumps({"commit": "0" * 40, "clean": True, "start": "then"}))
    config = suite.configs(s, paths, [cell])[cell]
    assert config.resume

    def simulate(config, run_dir):
        assert not config.resume and not (run_dir / "checkpoint.json").exists()
        return {"rounds": [], "summary": {"accuracy": 0.5}}

    record = suite.run_cell(cell, config, paths, simulate, jobs=1)
    assert record["provenance"]["attempts"] == 1 and record["provenance"]["start"] != "then"
    assert suite.read_cell(paths.cell(cell)) == record


def _fixture_metrics(accuracy: float, commit: str, clean: bool = True, code: str = "c0de", end: str = "01") -> dict:
    rounds = [{"round": t, "accuracy": accuracy * t / 2, "bytes_up": 10, "bytes_down": 20} for t in range(3)]
    summary = {"accuracy": accuracy, "density": 0.05, "bytes_ratio": 0.2, "bytes_up": 20, "bytes_down": 40,
               "flops": {"dense": 1000, "sparse": 60}, "model_size": {"sparse_bytes": 300}, "wall_seconds": 2.0,
               "federated_accuracy": accuracy - 0.01}
    p = {"commit": commit * 40, "clean": clean, "code": code, "config_hash": "ab" * 8, "torch": "t", "flwr": "f",
         "ray": "r", "cores": 2, "device": "cpu: x", "jobs": 1, "attempts": 1,
         "start": f"2026-01-01T00:{end}:00+00:00", "end": f"2026-01-01T01:{end}:00+00:00"}
    return {"rounds": rounds, "summary": summary, "provenance": p}


def test_report_only_rewrites_the_page_byte_for_byte_and_marks_cells(tmp_path, root, monkeypatch):
    path = _suite_file(tmp_path, {"fedtiny": 3, "synflow": 3, "fedavg": 1, "nosuchmethod": 1})
    paths = suite.Paths(root, "tiny")
    paths.cells.mkdir(parents=True)
    cells = {
        Cell("fedtiny", 0.05, 0): _fixture_metrics(0.80, "a"), Cell("synflow", 0.05, 0): _fixture_metrics(0.78, "a"),
        Cell("fedtiny", 0.05, 1): _fixture_metrics(0.82, "b", code="new", end="09"),
        Cell("synflow", 0.05, 1): _fixture_metrics(0.79, "b", clean=False, code="new", end="05"),
        Cell("fedavg", 1.0, 0): _fixture_metrics(0.90, "b", code="new", end="07"),
    }
    for cell, metrics in cells.items():
        paths.cell(cell).write_text(json.dumps(metrics))
    paths.cell(Cell("fedtiny", 0.05, 2)).write_text('{"rounds": [], "summ')  # cut short: not a finished cell
    monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("--report-only ran something"))
    assert main(["compare", "--suite", str(path), "--report-only"]) == 0
    written = {p: p.read_bytes() for p in [paths.page, *paths.plots.iterdir()]}
    assert len(written) == 4
    for p in written:
        p.unlink()
    assert main(["compare", "--suite", str(path), "--report-only"]) == 0
    assert {p: p.read_bytes() for p in [paths.page, *paths.plots.iterdir()]} == written
    page = paths.page.read_text()
    assert "Cells: 5 of 8 finished" in page and "`nosuchmethod-d0.05-s0`, `fedtiny-d0.05-s2`, `synflow-d0.05-s2`" in page
    assert "| 0.05 | fedtiny | 2 | 81.00 ± 1.41 % |" in page
    assert "| 0.05 | synflow | 2 | +2.50 | [-3.85, +8.85] | 0 of 2 |" in page  # paired: 0.80-0.78, 0.82-0.79
    assert "Newest cell: commit `bbbbbbbbbb`, code `new`. 3 of 5 cells are marked" in page
    assert "| fedtiny-d0.05-s0 | 80.00 % | `aaaaaaaaaa` |" in page and page.count("| other code |") == 2
    assert "| synflow-d0.05-s1 |" in page and page.count("| dirty tree |") == 1
    assert "| `aaaaaaaaaa` | `c0de` | 2 | 0 |" in page and "| `bbbbbbbbbb` | `new` | 3 | 1 |" in page
    assert suite_page.render(suite.load(str(path)), paths, suite.finished(suite.load(str(path)), paths)) == page


def test_report_only_without_cells_says_so(tmp_path, root, capsys):
    assert main(["compare", "--suite", str(_suite_file(tmp_path, {"snip": 1})), "--report-only"]) == 2
    assert "no finished cell of suite tiny" in capsys.readouterr().err


def test_suite_flags_refuse_per_run_settings(tmp_path, root, capsys):
    path = str(_suite_file(tmp_path, {"snip": 1}))
    assert main(["compare", "--suite", path, "fl.rounds=1"]) == 2
    assert main(["compare", "--suite", path, "--jobs", "0"]) == 2
    assert main(["compare", "--suite", path, "--methods", "imp"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "drop --config" in err[0] and "--jobs 0" in err[1] and "keep no cell" in err[2]


def test_jobs_run_cells_side_by_side_and_each_rewrites_the_page(tmp_path):
    s = suite.parse("tiny", yaml.safe_load(_suite_file(tmp_path, {"snip": 2, "fedavg": 2}).read_text()))
    paths = suite.Paths(tmp_path, "tiny")
    todo = suite.configs(s, paths, s.cells())
    pages = []
    log = lambda line: pages.append(paths.page.read_text() if line.endswith("finished") else None)  # noqa: E731

    def simulate(config, run_dir):
        return _fixture_metrics(0.5 + config.seed / 10, "a")

    assert suite.run(s, paths, todo, simulate, jobs=2, log=log) == []
    assert len(suite.finished(s, paths)) == 4
    written = [p for p in pages if p is not None]
    assert len(written) == 4 and "Cells: 4 of 4 finished" in paths.page.read_text()
    assert all(json.loads(paths.cell(c).read_text())["provenance"]["jobs"] == 2 for c in s.cells())


@pytest.mark.parametrize("name", sorted(p.stem for p in suite.SUITES_DIR.glob("*.yaml")))
def test_committed_pages_are_what_their_cells_give(name, tmp_path):
    s = suite.load(name)
    committed = suite.Paths(provenance.PROJECT_ROOT, name)
    results = suite.finished(s, committed)
    if not results:
        pytest.skip(f"suite {name} has no committed cells")
    again = suite.Paths(tmp_path, name)
    suite_page.write(s, again, results)
    assert again.page.read_bytes() == committed.page.read_bytes()
    for plot in again.plots.iterdir():
        assert plot.read_bytes() == (committed.plots / plot.name).read_bytes(), plot.name


def test_compare_needs_methods_or_a_suite(capsys):
    assert main(["compare", "--densities", "0.05"]) == 2
    assert capsys.readouterr().err == "fedtiny: give --methods (or --suite NAME)\n"


def test_an_interrupt_with_jobs_stops_every_running_cell(tmp_path, monkeypatch):
    s = suite.parse("tiny", yaml.safe_load(_suite_file(tmp_path, {"snip": 3}).read_text()))
    paths = suite.Paths(tmp_path, "tiny")
    stopped = []
    monkeypatch.setattr(suite, "_stop_children", lambda: stopped.append(True))

    def simulate(config, run_dir):
        if config.seed == 1:
            raise KeyboardInterrupt
        return _fixture_metrics(0.5, "a")

    with pytest.raises(KeyboardInterrupt):
        suite.run(s, paths, suite.configs(s, paths, s.cells()), simulate, jobs=2, log=lambda line: None)
    assert stopped == [True] and suite.read_cell(paths.cell(Cell("snip", 0.05, 1))) is None


@pytest.mark.integration
def test_a_suite_cell_runs_in_flower_simulation(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "ROOT", tmp_path / "root")
    assert main(["compare", "--suite", str(_suite_file(tmp_path, {"fedavg": 1}))]) == 0
    record = suite.read_cell(suite.Paths(tmp_path / "root", "tiny").cell(Cell("fedavg", 1.0, 0)))
    assert record["summary"]["accuracy"] > 0 and PROVENANCE <= set(record["provenance"])
