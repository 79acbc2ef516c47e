"""`fedtiny compare --suite NAME`: a published comparison as a file, run cell by cell, resumable.

A suite (`simulations/suites/NAME.yaml`) names a config, methods, densities and each method's
number of seeds. Each cell (method, density, seed) is one `fedtiny run` in
`outputs/suites/NAME/<cell>/`; when it finishes, its metrics plus a provenance block
(`simulations.provenance`) are written in one atomic step to
`simulations/results/NAME/cells/<cell>.json`, the committed record, and the page
`docs/results/NAME.md` (plots in `docs/results/NAME/`) is regenerated from those files alone
(`simulations.cli.suite_page`). A cell is finished exactly when its file is complete, so after
Ctrl-C or a crash the same command runs only what is missing; an interrupted cell continues from
its last round checkpoint when it would run the same commit and settings, else it starts again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import yaml

from shared.config import Config, ConfigError
from simulations import provenance
from simulations.cli import compare, suite_page
from simulations.cli.common import EXIT_INTERRUPTED, EXIT_RUN_FAILED, preflight
from simulations.cli.compare import Cell

SUITES_DIR = provenance.PROJECT_ROOT / "simulations" / "suites"
START_FILE = "provenance.json"  # in a cell's run folder: the record of its first attempt
KEYS = {"description", "config", "focus", "densities", "seeds", "methods"}
NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
METHOD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # it names files: no path, no package.module:Class
MAX_SEEDS = 100


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    config: str  # relative to the project root
    focus: str
    densities: tuple[float, ...]
    seeds: dict[tuple[str, float], int]  # (method, density) -> number of seeds, 0 to n-1

    def cells(self) -> list[Cell]:
        """Seed by seed (so a grid run in parts has paired seeds early), then method, then density."""
        top = max(self.seeds.values())
        return [Cell(m, d, s) for s in range(top) for (m, d), n in self.seeds.items() if s < n]


@dataclass(frozen=True)
class Paths:
    """Where a suite's cells, page, plots and run folders live under the project root `root`."""

    root: Path
    name: str

    @property
    def cells(self) -> Path:
        return self.root / "simulations" / "results" / self.name / "cells"

    @property
    def page(self) -> Path:
        return self.root / "docs" / "results" / f"{self.name}.md"

    @property
    def plots(self) -> Path:
        return self.root / "docs" / "results" / self.name

    @property
    def work(self) -> Path:
        return self.root / "outputs" / "suites" / self.name

    def cell(self, cell: Cell) -> Path:
        return self.cells / f"{cell.name}.json"


def load(name_or_path: str) -> Suite:
    """A suite by name (simulations/suites/NAME.yaml) or by a .yaml path; ConfigError names what is wrong."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        if not NAME.fullmatch(name_or_path):
            raise ConfigError(f"--suite {name_or_path!r} is neither a suite name ([a-z0-9_-]) nor a .yaml file")
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
        raise ConfigError(f"--suite {name_or_path!r}: no file {path}; suites: {known}")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"suite {path}: not readable YAML ({str(exc).splitlines()[0]})") from None
    return parse(path.stem, raw)


def parse(name: str, raw: object) -> Suite:
    """Validate a suite's YAML content (hostile until checked)."""
    where = f"suite {name}"
    if not NAME.fullmatch(name):
        raise ConfigError(f"{where}: the file name must be [a-z0-9_-] (it names the results folder)")
    if not isinstance(raw, dict) or not {"config", "densities", "methods"} <= set(raw) or set(raw) - KEYS:
        raise ConfigError(f"{where}: needs keys config, densities and methods (optional: description, focus, seeds); "
                          f"got {sorted(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__}")
    config = raw["config"]
    root = provenance.PROJECT_ROOT.resolve()
    if not isinstance(config, str) or not (root / config).resolve().is_relative_to(root) or not (root / config).is_file():
        raise ConfigError(f"{where}: config {config!r} is not a file under the project root")
    densities = raw["densities"]
    if not isinstance(densities, list) or not densities or not all(_density(d) for d in densities):
        raise ConfigError(f"{where}: densities must be a non-empty list of numbers in (0, 1]")
    densities = list(dict.fromkeys(float(d) for d in densities))
    methods = raw["methods"]
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{where}: methods must map each method to its number of seeds")
    default = _count(raw.get("seeds", 1), f"{where}: seeds")
    seeds: dict[tuple[str, float], int] = {}
    for method, spec in methods.items():
        if not isinstance(method, str) or not METHOD.fullmatch(method):
            raise ConfigError(f"{where}: method {method!r} is not a name ([A-Za-z0-9_.-])")
        if isinstance(spec, dict) and not set(spec) <= set(densities):
            raise ConfigError(f"{where}: seeds of {method} name densities {sorted(map(str, spec))} not all in {densities}")
        for d in [1.0] if method == compare.DENSE else densities:
            n = spec.get(d) if isinstance(spec, dict) and d != 1.0 else spec
            seeds[(method, d)] = default if n is None else _count(n, f"{where}: seeds of {method} at {d:g}")
    focus = raw.get("focus", compare.FOCUS)
    if "focus" in raw and focus not in methods:
        raise ConfigError(f"{where}: focus {focus!r} is not one of its methods")
    description = raw.get("description", "")
    return Suite(name, str(description), config, focus, tuple(densities), seeds)


def _density(d: object) -> bool:
    return isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and 0 < d <= 1


def _count(n: object, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SEEDS:
        raise ConfigError(f"{what} must be a whole number from 1 to {MAX_SEEDS} (or, per method, one per density)")
    return n


def read_cell(path: Path) -> dict | None:
    """A cell's record when it is complete (summary with an accuracy, provenance with an end), else None."""
    try:
        metrics = json.loads(path.read_text())
        done = isinstance(metrics["summary"]["accuracy"], (int, float)) and "end" in metrics["provenance"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return metrics if done else None


def finished(suite: Suite, paths: Paths) -> dict[Cell, dict]:
    """The suite's complete cells, in suite order."""
    out = {}
    for cell in suite.cells():
        metrics = read_cell(paths.cell(cell))
        if metrics is not None:
            out[cell] = metrics
    return out


def select(cells: Sequence[Cell], methods=None, densities=None, seeds=None) -> list[Cell]:
    """The cells a --methods / --densities / --seeds filter keeps (None keeps all)."""
    return [c for c in cells if (methods is None or c.method in methods) and (seeds is None or c.seed in seeds)
            and (densities is None or c.density in densities or c.method == compare.DENSE)]


def configs(suite: Suite, paths: Paths, cells: Sequence[Cell]) -> dict[Cell, Config]:
    """Every cell's config, before anything runs: an unregistered method fails here with one line."""
    for method in dict.fromkeys(c.method for c in cells):
        compare.method_overrides(method, f"suite {suite.name}")
    config_file = str(provenance.PROJECT_ROOT / suite.config)
    return {c: compare.cell_config(c, paths.work, config_file, []) for c in cells}


def run_cell(cell: Cell, config: Config, paths: Paths, simulate: Callable[[Config, Path], dict], jobs: int) -> dict:
    """Run (or continue) one cell and write its record; returns the record."""
    from server import checkpoint  # torch: only when a cell runs, so `compare --help` stays quick

    run_dir = paths.work / cell.name
    record = {**provenance.start(config, jobs=jobs), "attempts": 1}
    first = _json(run_dir / START_FILE)
    if checkpoint.exists(run_dir):
        if first is not None and provenance.same_source(first, record):
            record |= {"start": first["start"], "attempts": first.get("attempts", 1) + 1}
        else:  # a partial run of other code or settings: a cell comes from one commit
            shutil.rmtree(run_dir)
            config = replace(config, resume=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / START_FILE, json.dumps(record, indent=1))
    metrics = simulate(config, run_dir)
    metrics["provenance"] = {**record, "end": provenance.now()}
    paths.cells.mkdir(parents=True, exist_ok=True)
    _atomic_write(paths.cell(cell), json.dumps(metrics, indent=1) + "\n")
    return metrics


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(
    suite: Suite,
    paths: Paths,
    todo: dict[Cell, Config],
    simulate: Callable[[Config, Path], dict],
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run the unfinished cells `todo`, `jobs` at a time, rewriting the page after each; the failure lines."""
    failures: list[str] = []
    names = {c: f"[{i}/{len(todo)}] {c.name}" for i, c in enumerate(todo, 1)}

    def done(cell: Cell, error: BaseException | None) -> None:
        if error is None:
            suite_page.write(suite, paths, finished(suite, paths))
            log(f"{names[cell]}: finished")
        elif isinstance(error, RuntimeError):  # a failed run (launch.RunFailed): the others go on
            failures.append(f"{cell.name}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
            log(f"{names[cell]}: FAILED ({failures[-1]})")
        else:
            raise error

    if jobs == 1:
        for cell, config in todo.items():
            log(f"{names[cell]}: running")
            try:
                run_cell(cell, config, paths, simulate, jobs)
                error = None
            except RuntimeError as exc:
                error = exc
            done(cell, error)
        return failures
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running = {}
        try:
            for cell, config in todo.items():
                log(f"{names[cell]}: queued")
                running[pool.submit(run_cell, cell, config, paths, simulate, jobs)] = cell
            while running:
                finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished_now:
                    done(running.pop(future), future.exception())
        except BaseException:  # Ctrl-C or a bug: stop every run this process started, then leave
            for future in running:
                future.cancel()
            _stop_children()
            raise
    return failures


def _stop_children() -> None:
    """Stop the process trees this process started (each cell's SuperLink, `flwr run` and Ray)."""
    import psutil

    from simulations.cli.processes import stop_tree

    for child in psutil.Process().children():
        stop_tree(child)


ROOT = provenance.PROJECT_ROOT  # where results, pages and run folders go


def command(args: argparse.Namespace) -> int:
    """`fedtiny compare --suite NAME [--jobs N] [--report-only] [--methods/--densities/--seeds filters]`."""
    from simulations.cli.launch import simulate

    if args.config or args.overrides or args.focus != compare.FOCUS:
        raise ConfigError("--suite takes the config, the focus and every setting from the suite file; "
                          "drop --config, --focus and key=value overrides")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} must be at least 1")
    suite = load(args.suite)
    paths = Paths(ROOT, suite.name)
    keep = [None if text is None else compare._list(text, cast, flag) for text, cast, flag in (
        (args.methods, str, "--methods"), (args.densities, float, "--densities"), (args.seeds, int, "--seeds"))]
    cells = select(suite.cells(), *keep)
    if not cells:
        raise ConfigError(f"--methods, --densities and --seeds keep no cell of suite {suite.name}")
    have = finished(suite, paths)
    if args.report_only:
        if not have:
            raise ConfigError(f"no finished cell of suite {suite.name} in {paths.cells}; run it without --report-only first")
        print(f"wrote {suite_page.write(suite, paths, have)}")
        return 0
    todo = configs(suite, paths, [c for c in cells if c not in have])
    for config in todo.values():  # each cell's data, partition and density, before the first run
        preflight(config)
    print(f"suite {suite.name}: {len(cells) - len(todo)} of {len(cells)} cells finished; running {len(todo)}")
    try:
        failures = run(suite, paths, todo, lambda config, run_dir: simulate(config, run_dir, progress=False, echo=False),
                       args.jobs)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every process of the running cells is stopped by now
        print(f"\nfedtiny: interrupted; continue the suite (finished cells are skipped) with: "
              f"{shlex.join(['fedtiny', *args.argv])}", file=sys.stderr)
        return EXIT_INTERRUPTED
    final = finished(suite, paths)
    if final:  # also when nothing ran, so the page always matches the cells
        print(f"wrote {suite_page.write(suite, paths, final)}")
    for line in failures:
        print(f"fedtiny: run failed: {line}", file=sys.stderr)
    return EXIT_RUN_FAILED if failures else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--suite` and `--jobs` of `fedtiny compare`."""
    known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
    parser.add_argument("--suite", help=f"run a result suite (simulations/suites/NAME.yaml: {known}); its missing cells "
                                        "only, then docs/results/NAME.md; --methods/--densities/--seeds filter its cells")
    parser.add_argument("--jobs", type=int, default=1, help="with --suite: cells run at once (default 1)")
