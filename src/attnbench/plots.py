"""Axes shared by the report's and the benchmark's figures: log-log against the measured sequence lengths."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, NullFormatter


def length_label(T: int) -> str:
    """A sequence length as its axis label: 512, 2K, 32K."""
    return f"{T // 1024}K" if T >= 1024 and T % 1024 == 0 else str(T)


def log_length_axes(ax: Axes, lengths) -> None:
    """Log-log axes whose x ticks are the measured lengths and whose y ticks read as plain numbers, with the legend
    outside the lines: matplotlib's defaults put ticks such as 3 x 10^3 between the points and the legend over them."""
    ax.set(xscale="log", yscale="log")
    ticks = sorted(set(lengths))
    ax.set_xticks(ticks, [length_label(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())

    def minor_label(y, _):  # 2 and 5 between the powers of ten, where the axis spans few enough of them to fit
        low, high = ax.get_ylim()
        return f"{y:g}" if high <= 1000 * low and f"{y:.0e}"[0] in "25" else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor_label))
    legend_beside(ax)


def legend_beside(ax: Axes) -> None:
    """The legend to the right of the plot, where it hides no line."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)
