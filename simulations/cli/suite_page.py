"""A result suite's page, `docs/results/NAME.md` with plots in `docs/results/NAME/`, from its cells alone.

The page is a function of the suite file and the cell records: nothing of the machine or the
moment it is written on enters it, so `fedtiny compare --suite NAME --report-only` on the
committed cells reproduces the committed page byte for byte. It holds the mean ± std table
(`simulations.cli.compare`), the focus method minus each federated baseline seed by seed
(`simulations.cli.paired`), FedTiny's policy selections, the plots, and where every cell came from
(`simulations.provenance`): a cell run from a tree with uncommitted changes, or from library code
other than that of the newest cell, is marked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from shared import rundir
from simulations.cli import compare, paired
from simulations.cli.compare import Cell

if TYPE_CHECKING:
    from simulations.cli.suite import Paths, Suite

SHORT = 10  # hex digits of a commit shown
DEFAULTS = "configs/default.yaml"  # what every config is merged onto (shared.config.load_config)


def write(suite: Suite, paths: Paths, results: dict[Cell, dict]) -> Path:
    """Write the plots and the page (atomically) for `results`, the suite's finished cells in suite order."""
    paths.plots.mkdir(parents=True, exist_ok=True)
    compare.plot(results, compare.summarize([compare.row(c, m) for c, m in results.items()]), paths.plots, compare.DENSE)
    tmp = paths.page.with_suffix(".md.tmp")
    tmp.write_text(render(suite, paths, results))
    os.replace(tmp, paths.page)
    return paths.page


def render(suite: Suite, paths: Paths, results: dict[Cell, dict]) -> str:
    rows = [compare.row(c, m) for c, m in results.items()]
    marks = marked(results)
    rel = lambda p: p.relative_to(paths.root).as_posix()  # noqa: E731
    parts = [
        f"# Result suite `{suite.name}`\n",
        *([f"{suite.description.strip()}\n"] if suite.description.strip() else []),
        f"Written by `fedtiny compare --suite {suite.name}` from the cell records in `{rel(paths.cells)}/` alone "
        f"(`--report-only` rewrites it without running anything): change the suite "
        f"(`simulations/suites/{suite.name}.yaml`) or the cells, never this page.\n",
        f"- Settings: `{suite.config}`{'' if suite.config == DEFAULTS else f' merged onto `{DEFAULTS}`'}, densities "
        f"{', '.join(f'{d:g}' for d in suite.densities)}"
        f"{' (dense FedAvg once per seed)' if any(m == compare.DENSE for m, _ in suite.seeds) else ''}.\n"
        f"- Cells: {len(results)} of {len(suite.cells())} finished.\n",
        "## Accuracy, bytes, FLOPs and wall time\n",
        "Final test accuracy, mean ± sample std over seeds; federated accuracy is the final model's on the "
        "clients' held-out data; bytes are both directions relative to dense FedAvg's; FLOPs per example of the "
        "final model (relative to dense); wall seconds of the run itself (more when cells ran side by side, "
        "`jobs` below).\n",
        compare.markdown(compare.summarize(rows)),
    ]
    rows_marked = _marked_rows(marks)
    if rows_marked:
        parts.append(f"Rows with a marked cell (see Provenance): {rows_marked}.\n")
    ablations = [a for a, overrides in compare.ALIASES.items() if f"method={suite.focus}" in overrides]
    pairs = paired.markdown(paired.paired_differences(rows, suite.focus, [compare.DENSE, compare.CEILING, *ablations]),
                            suite.focus)
    if pairs:
        parts += [f"## {suite.focus} minus each federated baseline, seed by seed\n",
                  "Accuracy points; a seed's runs share its data, partitions and starting model.\n", pairs]
    searches = compare.search_table(results)
    if searches:
        parts += ["## FedTiny's policy selections\n", "Held-out loss on the search clients.\n", searches]
    plots = paths.plots.relative_to(paths.page.parent).as_posix()
    parts += ["## Plots\n", "\n".join(f"![{name[:-4].replace('_', ' ')}]({plots}/{name})"
                                      for name in rundir.COMPARISON_PLOTS.values()) + "\n"]
    parts += provenance_section(results, marks)
    missing = [c.name for c in suite.cells() if c not in results]
    if missing:
        parts += ["## Missing cells\n", ", ".join(f"`{m}`" for m in missing) + "\n"]
    return "\n".join(parts)


def newest(results: dict[Cell, dict]) -> dict:
    """The provenance of the cell that ended last (the first such cell in suite order)."""
    return max((m["provenance"] for m in results.values()), key=lambda p: p["end"])


def marked(results: dict[Cell, dict]) -> dict[Cell, str]:
    """Why each cell is marked: run from a dirty tree, or from code other than the newest cell's."""
    code = newest(results)["code"]
    out = {}
    for cell, metrics in results.items():
        p = metrics["provenance"]
        why = [w for w, bad in (("dirty tree", p["clean"] is not True), ("other code", p["code"] != code)) if bad]
        if why:
            out[cell] = " and ".join(why)
    return out


def _marked_rows(marks: dict[Cell, str]) -> str:
    counts: dict[tuple[str, float], int] = {}
    for cell in marks:
        counts[(cell.method, cell.density)] = counts.get((cell.method, cell.density), 0) + 1
    return ", ".join(f"{m} at {d:g} ({n})" for (m, d), n in counts.items())


def provenance_section(results: dict[Cell, dict], marks: dict[Cell, str]) -> list[str]:
    """The commits the cells come from, then one line per cell."""
    last = newest(results)
    commits: dict[str, list[dict]] = {}
    for metrics in results.values():
        commits.setdefault(metrics["provenance"]["commit"], []).append(metrics["provenance"])
    lines = ["| commit | code | cells | from a dirty tree | devices | torch / flwr / ray | first start | last end |",
             "|---|---|---:|---:|---|---|---|---|"]
    for commit, records in commits.items():
        devices = ", ".join(dict.fromkeys(f"{p['device']} ({p['cores']} cores)" for p in records))
        software = ", ".join(dict.fromkeys(f"{p['torch']} / {p['flwr']} / {p['ray']}" for p in records))
        lines.append(f"| `{commit[:SHORT]}` | `{records[0]['code']}` | {len(records)} "
                     f"| {sum(p['clean'] is not True for p in records)} | {devices} | {software} "
                     f"| {min(p['start'] for p in records)} | {max(p['end'] for p in records)} |")
    cells = ["| cell | accuracy | commit | config hash | jobs | attempts | start | end | marked |",
             "|---|---:|---|---|---:|---:|---|---|---|"]
    for cell, metrics in results.items():
        p = metrics["provenance"]
        cells.append(f"| {cell.name} | {100 * metrics['summary']['accuracy']:.2f} % | `{p['commit'][:SHORT]}` "
                     f"| `{p['config_hash']}` | {p.get('jobs', 1)} | {p.get('attempts', 1)} | {p['start']} | {p['end']} "
                     f"| {marks.get(cell, '')} |")
    summary = (f"{len(marks)} of {len(results)} cells are marked: run from a tree with uncommitted changes, or from "
               f"library code (`client/`, `server/`, `shared/`, `pyproject.toml`) other than the newest cell's"
               if marks else f"All {len(results)} cells ran from a clean tree with the newest cell's library code")
    return ["## Provenance\n",
            f"Newest cell: commit `{last['commit'][:SHORT]}`, code `{last['code']}`. {summary}.\n",
            "\n".join(lines) + "\n", "\n".join(cells) + "\n"]
