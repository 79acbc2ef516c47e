"""Plots people read: byte counts in KB / MB / GB, accuracy in %, integer rounds."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shared.units import bytes_axis, human_bytes  # noqa: E402
from simulations.cli.compare import Cell  # noqa: E402
from simulations.cli.compare_plots import _panel  # noqa: E402


def test_byte_counts_read_in_decimal_units() -> None:
    assert [human_bytes(n) for n in (512, 1_000, 1_234_567, 215_421_120, 2.5e9)] == [
        "512 B", "1 KB", "1.23 MB", "215 MB", "2.5 GB"]


def _labels(ax, which: str = "x") -> list[str]:
    ax.figure.canvas.draw()
    axis = ax.xaxis if which == "x" else ax.yaxis
    ticks = [*axis.get_majorticklabels(), *axis.get_minorticklabels()]
    return [t.get_text() for t in ticks if t.get_text()]


def test_a_wide_bytes_axis_labels_decades_and_a_narrow_one_its_2x_and_5x_ticks() -> None:
    fig, ax = plt.subplots()
    ax.plot([2e3, 3e7], [0, 1])
    bytes_axis(ax.xaxis)
    wide = _labels(ax)
    assert {"10 KB", "100 KB", "1 MB", "10 MB"} <= set(wide) and "20 KB" not in wide
    ax.set_xlim(1.1e5, 6e5)
    narrow = _labels(ax)
    assert {"200 KB", "500 KB"} <= set(narrow) and not any("10^" in t or "$" in t for t in narrow)
    plt.close(fig)


def _run(accuracy: float) -> dict:
    return {"rounds": [{"round": t, "accuracy": accuracy * t / 30, "bytes_up": 1000, "bytes_down": 2000}
                       for t in range(31)]}


def test_compare_curves_are_in_percent_over_integer_rounds_or_bytes() -> None:
    results = {Cell("fedavg", 1.0, 0): _run(0.9), Cell("fedtiny", 0.05, 0): _run(0.8)}
    colors = {"fedavg": "C0", "fedtiny": "C1"}
    fig, (by_round, by_bytes) = plt.subplots(1, 2)
    _panel(by_round, results, list(colors), colors, "fedavg", 0.05, by_bytes=False)
    _panel(by_bytes, results, list(colors), colors, "fedavg", 0.05, by_bytes=True)
    assert "%" in by_round.get_ylabel() and by_round.get_xlabel() == "round"
    assert max(by_round.lines[1].get_ydata()) == 80.0
    by_round.set_xlim(0, 3)  # few rounds: a default axis would tick 0.5, 1.5, ...
    assert all(float(x).is_integer() for x in by_round.xaxis.get_major_locator()())
    assert all(t.endswith("B") for t in _labels(by_bytes))
    plt.close(fig)
