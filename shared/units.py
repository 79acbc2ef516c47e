"""Byte counts as people read them (B, KB, MB, GB: powers of 1000, as network traffic is counted), in text and on plot axes."""

from __future__ import annotations

UNITS = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3))


def human_bytes(n: float) -> str:
    """`1234567` -> `1.23 MB`; below 1 KB the exact count (`512 B`)."""
    for unit, scale in UNITS:
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def bytes_axis(axis) -> None:
    """Make a matplotlib axis a log axis of byte counts labelled 10 KB, 100 KB, 1 MB, ... (not 10^6);
    over less than two decades the 2x and 5x ticks are labelled too, so a narrow axis still reads."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    def minor(value: float, _) -> str:
        low, high = axis.get_view_interval()
        return human_bytes(value) if high < 100 * max(low, 1e-12) else ""

    (axis.axes.set_xscale if axis.axis_name == "x" else axis.axes.set_yscale)("log")
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(lambda value, _: human_bytes(value)))
    axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    axis.set_minor_formatter(FuncFormatter(minor))
