"""One method against each federated baseline, seed by seed: the comparison a grid supports.

A grid's runs of one seed share that seed's data, partitions, initial model and (for methods with
the same random streams) sampled clients, so the difference of two methods on a seed is far less
noisy than the difference of their means: per-method std over seeds mixes in how lucky the seed's
clients were. `fedtiny compare` writes this table under the mean ± std table. The interval is
Student's t at 95% over the seeds both methods ran (none with one seed); "below on" counts the seeds
where the method ends under the baseline, which is what a per-seed requirement ("never below on
any seed") is checked against. It reads the test split: a report, not a score to choose settings by
(`simulations.heldout` scores the clients' held-out data).
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

CONFIDENCE = 0.95


def interval(diffs: Sequence[float]) -> tuple[float, float] | None:
    """The two-sided Student t interval of the mean difference; None with fewer than two seeds."""
    if len(diffs) < 2:
        return None
    mean, sem = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    from scipy import stats  # here, not at import: `fedtiny compare --help` answers at once

    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(diffs) - 1)) * sem
    return mean - half, mean + half


def paired_differences(rows: Sequence[dict], focus: str, exclude: Sequence[str]) -> list[dict]:
    """`focus` minus every other method of the same density, on the seeds both ran.

    `exclude` names methods that are not baselines (dense FedAvg, the ceiling, the focus's
    ablations). Rows: density, baseline, seeds, mean and interval of the test-accuracy difference,
    seeds below; baselines by their mean accuracy on those seeds, best first.
    """
    by_cell = {(r["method"], float(r["density"]), int(r["seed"])): r for r in rows}
    out = []
    for d in sorted({float(r["density"]) for r in rows if r["method"] == focus}, reverse=True):
        mine = {s: r for (m, dd, s), r in by_cell.items() if m == focus and dd == d}
        baselines = dict.fromkeys(r["method"] for r in rows if float(r["density"]) == d and r["method"] not in (focus, *exclude))
        found = []
        for b in baselines:
            pairs = [(mine[s], by_cell[(b, d, s)]) for s in sorted(mine) if (b, d, s) in by_cell]
            if not pairs:
                continue
            diffs = [float(a["accuracy"]) - float(o["accuracy"]) for a, o in pairs]
            found.append({
                "density": d, "baseline": b, "seeds": len(pairs), "mean": statistics.fmean(diffs),
                "interval": interval(diffs), "below": sum(x < 0 for x in diffs),
                "baseline_accuracy": statistics.fmean(float(o["accuracy"]) for _, o in pairs),
            })
        out += sorted(found, key=lambda f: -f["baseline_accuracy"])
    return out


def markdown(diffs: Sequence[dict], focus: str) -> str:
    """The table, in accuracy points; empty when `focus` shares no seed with a baseline."""
    if not diffs:
        return ""
    lines = [
        f"| density | {focus} minus | seeds | test (mean) | {100 * CONFIDENCE:g}% interval | below on |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for x in diffs:
        ci = x["interval"]
        span = f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "n/a"
        lines.append(f"| {x['density']:g} | {x['baseline']} | {x['seeds']} | {100 * x['mean']:+.2f} | {span} "
                     f"| {x['below']} of {x['seeds']} |")
    return "\n".join(lines) + "\n"
