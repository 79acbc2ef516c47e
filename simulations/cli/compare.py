"""`fedtiny compare`: run a grid of methods x densities x seeds on the same data and budget, and tabulate it.

Every cell is one `fedtiny run` (same config, partitions and codec; only the method, the density
and the seed change) in `<output_dir>/<method>-d<density>-s<seed>`. A cell whose metrics.json
already has a summary with an accuracy is not rerun, so an interrupted grid resumes. Dense
FedAvg is run once per seed (density 1). Outputs: comparison.csv (one row per run),
comparison.md (mean +- std over seeds; FedTiny minus each federated baseline seed by seed,
`simulations.cli.paired`; each FedTiny run's policy search) and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from shared import rundir
from shared.config import Config, ConfigError, load_config
from simulations.cli import paired
from simulations.cli.compare_plots import plot
from simulations.cli.commands import METHODS, help_for
from simulations.cli.common import EXIT_INTERRUPTED, EXIT_RUN_FAILED, finished, preflight

# Ablations of FedTiny, selectable as method names in a comparison.
ALIASES: dict[str, list[str]] = {
    "fedtiny-noabns": ["method=fedtiny", "fedtiny.abns=false"],
    "fedtiny-noprogressive": ["method=fedtiny", "fedtiny.progressive=false"],
    "fedtiny-abnsonly": ["method=fedtiny", "fedtiny.search_rounds=0"],  # no successive halving
}
DENSE = "fedavg"
CEILING = "centralized"
CEILING_LABEL = "centralized (ceiling, not federated)"
FOCUS = "fedtiny"  # the method `comparison.md` compares seed by seed with every federated baseline
DEFAULT_DENSITIES = "0.01,0.05"
DEFAULT_OUTPUT_DIR = "outputs/compare"  # one fixed folder (not timestamped), so a rerun resumes the grid
CSV_FIELDS = (
    "method", "density", "seed", "accuracy", "federated_accuracy", "final_density", "bytes_ratio", "bytes_total",
    "flops_sparse", "flops_dense", "model_bytes", "wall_seconds", "rounds", "selected",
)


@dataclass(frozen=True)
class Cell:
    method: str
    density: float
    seed: int

    @property
    def name(self) -> str:
        return rundir.safe_name(f"{self.method}-d{self.density:g}-s{self.seed}")


def method_overrides(name: str, flag: str = "--methods") -> list[str]:
    """Config overrides that select `name` (a method or a FedTiny ablation alias), given by `flag`."""
    from shared.methods import METHODS as REGISTRY

    if name in ALIASES:
        return list(ALIASES[name])
    if name in REGISTRY or ":" in name:  # a registered method, or package.module:Class (trusted)
        return [f"method={name}"]
    raise ConfigError(f"unknown method {name!r} in {flag}; known: {', '.join([*REGISTRY.names(), *ALIASES])}")


def grid(methods: Sequence[str], densities: Sequence[float], seeds: Sequence[int]) -> list[Cell]:
    """Cells in run order (seed, then method, then density); dense FedAvg once per seed at density 1."""
    for m in methods:
        method_overrides(m)
    for d in densities:
        if not 0.0 < d <= 1.0:
            raise ConfigError(f"density {d} in --densities must be in (0, 1]")
    cells: list[Cell] = []
    for s in seeds:
        for m in methods:
            for d in ([1.0] if m == DENSE else densities):
                cells.append(Cell(m, float(d), int(s)))
    return list(dict.fromkeys(cells))


def cell_config(cell: Cell, out: Path, config_file: str | None, overrides: Sequence[str]) -> Config:
    """The cell's config; a cell interrupted mid-run continues from its last round checkpoint."""
    from server import checkpoint

    resume = ["resume=true"] if checkpoint.exists(out / cell.name) else []
    return load_config(config_file, [
        *overrides, *method_overrides(cell.method), f"pruning.density={cell.density}",
        f"seed={cell.seed}", f"output_dir={out / cell.name}", *resume,
    ])


def run_grid(
    cells: Sequence[Cell],
    out: Path,
    config_file: str | None,
    overrides: Sequence[str],
    simulate: Callable[[Config, Path], dict],
    log: Callable[[str], None] = print,
) -> tuple[dict[Cell, dict], list[str]]:
    """Run every unfinished cell with `simulate(config, run_dir)`; (metrics by cell, failure lines).

    All configs are built (validated) before the first run, so a typo fails at once.
    """
    configs = {c: cell_config(c, out, config_file, overrides) for c in cells}
    results: dict[Cell, dict] = {}
    failures: list[str] = []
    for i, cell in enumerate(cells, 1):
        run_dir = out / cell.name
        done = finished(run_dir)
        if done is not None:
            log(f"[{i}/{len(cells)}] {cell.name}: done before, skipped")
            results[cell] = done
            continue
        log(f"[{i}/{len(cells)}] {cell.name}: running")
        try:
            results[cell] = simulate(configs[cell], run_dir)
        except RuntimeError as exc:
            failures.append(f"{cell.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            log(f"[{i}/{len(cells)}] {cell.name}: FAILED ({failures[-1]})")
    return results, failures


def row(cell: Cell, metrics: dict) -> dict:
    """One CSV row from a run's metrics.json content."""
    s = metrics["summary"]
    return {
        "method": cell.method,
        "density": cell.density,
        "seed": cell.seed,
        "accuracy": s["accuracy"],
        "federated_accuracy": s.get("federated_accuracy", float("nan")),  # clients' held-out data: for tuning
        "final_density": s.get("density", float("nan")),
        "bytes_ratio": s.get("bytes_ratio", float("nan")),
        "bytes_total": s.get("bytes_up", 0) + s.get("bytes_down", 0),
        "flops_sparse": s.get("flops", {}).get("sparse", float("nan")),
        "flops_dense": s.get("flops", {}).get("dense", float("nan")),
        "model_bytes": s.get("model_size", {}).get("sparse_bytes", float("nan")),
        "wall_seconds": s.get("wall_seconds", float("nan")),
        "rounds": len(metrics.get("rounds", [])) - 1,
        "selected": s.get("selected") or "",
    }


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Mean and sample std over seeds per (method, density), in the order methods first appear."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["density"]), []).append(r)
    order = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for (method, d), rs in sorted(groups.items(), key=lambda kv: (-kv[0][1], order.index(kv[0][0]))):
        acc, acc_std = _mean_std([r["accuracy"] for r in rs])
        out.append({
            "method": method, "density": d, "seeds": len(rs), "accuracy": acc, "accuracy_std": acc_std,
            "bytes_ratio": statistics.fmean(r["bytes_ratio"] for r in rs),
            "flops": statistics.fmean(r["flops_sparse"] for r in rs),
            "flops_ratio": statistics.fmean(r["flops_sparse"] / r["flops_dense"] for r in rs),
            "model_bytes": statistics.fmean(r["model_bytes"] for r in rs),
            "federated_accuracy": statistics.fmean(float(r.get("federated_accuracy", "nan")) for r in rs),
            "wall_seconds": statistics.fmean(float(r.get("wall_seconds", "nan")) for r in rs),
        })
    return out


def markdown(summary: Sequence[dict]) -> str:
    """The results table: accuracy mean +- std over seeds, bytes relative to dense FedAvg, FLOPs, model size."""
    lines = [
        "| density | method | seeds | accuracy (mean ± std) | federated accuracy | bytes vs dense FedAvg "
        "| FLOPs / example (vs dense) | model size | wall s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        label = CEILING_LABEL if s["method"] == CEILING else s["method"]
        lines.append(
            f"| {s['density']:g} | {label} | {s['seeds']} | {100 * s['accuracy']:.2f} ± {100 * s['accuracy_std']:.2f} % "
            f"| {100 * s['federated_accuracy']:.2f} % | {s['bytes_ratio']:.4f} | {_si(s['flops'])} ({s['flops_ratio']:.3f}) "
            f"| {_kib(s['model_bytes'])} | {s['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def search_table(results: dict[Cell, dict]) -> str:
    """FedTiny's policy search in each run that made one: the candidate selected, its pooled held-out
    loss after ABNS (rank among the candidates) and after each successive-halving stage, and what
    ABNS alone would have picked (the lowest ABNS loss). Empty when no run searched."""
    lines = []
    for cell, metrics in results.items():
        candidates = [c for c in metrics["summary"].get("candidates") or [] if _abns_loss(c) is not None]
        chosen = next((c for c in candidates if c["name"] == metrics["summary"].get("selected")), None)
        if chosen is None:  # no search (fedtiny.abns=false) or not FedTiny
            continue
        by_abns = sorted(candidates, key=_abns_loss)
        abns = _abns_loss(chosen)
        stages = " → ".join(f"{x:.3f}" for x in chosen.get("stages", [])) or "none"
        lines.append(f"| {cell.name} | {chosen['name']} | {abns:.3f} ({by_abns.index(chosen) + 1} of "
                     f"{len(candidates)}) | {stages} | {by_abns[0]['name']} |")
    if not lines:
        return ""
    return "\n".join([
        "| run | selected | its ABNS pooled loss (rank) | its loss after each halving stage | ABNS alone would pick |",
        "|---|---|---:|---|---|", *lines]) + "\n"


def _abns_loss(candidate: dict) -> float | None:
    """A candidate's pooled loss right after ABNS (runs without halving record it as `loss` only)."""
    return candidate.get("abns_loss", candidate.get("loss"))


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _kib(x: float) -> str:
    return f"{x / 1024:.1f} KiB" if math.isfinite(x) else "n/a"


def write_outputs(results: dict[Cell, dict], out: Path, focus: str = FOCUS) -> list[Path]:
    """comparison.csv, comparison.md and the plots for the finished cells."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [row(c, m) for c, m in results.items()]
    write_csv(rows, out / rundir.COMPARISON_CSV)
    ablations = [a for a, overrides in ALIASES.items() if f"method={focus}" in overrides]  # focus's own switches
    not_baselines = [DENSE, CEILING, *ablations]
    pairs = paired.markdown(paired.paired_differences(rows, focus, not_baselines), focus)
    searches = search_table(results)
    summary = summarize(rows)
    (out / rundir.COMPARISON_MD).write_text(
        markdown(summary)
        + (f"\n{focus} minus each federated baseline, seed by seed (accuracy points; a seed's runs share its data, partitions and starting model):\n\n{pairs}" if pairs else "")
        + (f"\nFedTiny's policy search (held-out loss on the search clients):\n\n{searches}" if searches else ""))
    return [out / rundir.COMPARISON_CSV, out / rundir.COMPARISON_MD, *plot(results, summary, out, DENSE)]


def _list(text: str, cast, flag: str) -> list:
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        values = [cast(s) for s in items]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of {cast.__name__} values") from None
    if not values:
        raise ConfigError(f"{flag} is empty; give a comma-separated list")
    return values


def _compare(args: argparse.Namespace) -> int:
    from simulations.cli import suite
    from simulations.cli.launch import simulate

    if args.suite:
        return suite.command(args)
    if not args.methods:
        raise ConfigError("give --methods (or --suite NAME)")
    methods = _list(args.methods, str, "--methods")
    densities = _list(args.densities or DEFAULT_DENSITIES, float, "--densities")
    seeds = _list(args.seeds or "0", int, "--seeds")
    method_overrides(args.focus, "--focus")  # a typo fails here, not as a silently missing table
    base = load_config(args.config, args.overrides)
    out = Path(base.output_dir or DEFAULT_OUTPUT_DIR).expanduser().resolve()
    overrides = [o for o in args.overrides if not o.startswith("output_dir=")]
    cells = grid(methods, densities, seeds)
    if args.report_only:
        cells = [c for c in cells if finished(out / c.name) is not None]
        if not cells:
            raise ConfigError(f"no finished cell of this grid in {out}; run it without --report-only first")
    for cell in cells:  # each cell's density against the dense first layer, before the first run
        preflight(cell_config(cell, out, args.config, overrides))
    try:
        results, failures = run_grid(
            cells, out, args.config, overrides, lambda config, run_dir: simulate(config, run_dir, progress=False, echo=False)
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every process of the running cell is stopped by now
        print(f"\nfedtiny: interrupted; continue the grid (finished cells are skipped) with: "
              f"{shlex.join(['fedtiny', *args.argv])}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if results:
        for path in write_outputs(results, out, args.focus):
            print(f"wrote {path}")
    for line in failures:
        print(f"fedtiny: run failed: {line}", file=sys.stderr)
    return EXIT_RUN_FAILED if failures else 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand to the `fedtiny` parser."""
    from simulations.cli import suite

    cmp = subparsers.add_parser("compare", help=help_for("compare"))
    cmp.add_argument("--methods",
                     help=f"comma-separated: {','.join([*METHODS, *ALIASES])} (or package.module:Class)")
    cmp.add_argument("--densities", help=f"comma-separated target densities (default {DEFAULT_DENSITIES}; fedavg runs dense once per seed)")
    cmp.add_argument("--seeds", help="comma-separated seeds (default 0)")
    cmp.add_argument("--config", help="YAML file merged onto configs/default.yaml")
    cmp.add_argument("--focus", default=FOCUS,
                     help="the method compared seed by seed with every federated baseline in comparison.md")
    cmp.add_argument("--report-only", action="store_true",
                     help="run nothing: write the table and plots from the grid's finished cells (a grid run in parts)")
    cmp.add_argument("overrides", nargs="*", help="key=value overrides for every run; output_dir= is the grid's folder")
    suite.add_arguments(cmp)
    cmp.set_defaults(func=_compare)
