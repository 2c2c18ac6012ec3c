"""Report files for a bundle's reports/ folder: JSON and PNG plots, byte-reproducible.

Plots use matplotlib's Agg backend with fixed metadata (no version or date stamps), so the
same numbers give the same PNG bytes and bundles stay reproducible.
"""

from __future__ import annotations

import io
import json

PNG_METADATA = {"Software": None}  # keep matplotlib's version out of the file


def json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _figure(title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata=PNG_METADATA)
    plt.close(fig)
    return buf.getvalue()


def bar_chart(labels: list[str], values: list[float], title: str, ylabel: str,
              log: bool = False) -> bytes:
    plt, fig, ax = _figure(title, ylabel)
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    if log:
        ax.set_yscale("log")
    return _png(plt, fig)


def line_chart(series: dict[str, list[float]], title: str, xlabel: str, ylabel: str) -> bytes:
    plt, fig, ax = _figure(title, ylabel)
    for name, ys in series.items():
        ax.plot(range(len(ys)), ys, marker=".", label=name)
    ax.set_xlabel(xlabel)
    ax.legend()
    return _png(plt, fig)


def scatter_chart(points: list[tuple], title: str, xlabel: str, ylabel: str,
                  hline: float | None = None, hline_label: str = "") -> bytes:
    """Labelled points (x, y, label, highlighted); a highlighted point is drawn larger and
    in another colour; `hline` draws a dashed horizontal line (a limit)."""
    plt, fig, ax = _figure(title, ylabel)
    for x, y, label, marked in points:
        ax.scatter([x], [y], s=80 if marked else 30, color="tab:red" if marked else "tab:blue",
                   zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    if hline is not None:
        ax.axhline(hline, linestyle="--", color="gray", label=hline_label)
        ax.legend()
    ax.set_xlabel(xlabel)
    return _png(plt, fig)
