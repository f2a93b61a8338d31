"""Figures of experiment results (matplotlib, headless)."""

import pathlib

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def _finish(fig, ax, title: str, path: str | pathlib.Path) -> pathlib.Path:
  """Title, a legend outside the axes, and the PNG written."""
  ax.set_title(title)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def bar_chart(rows: dict[str, dict[str, float]], path: str | pathlib.Path, title: str) -> pathlib.Path:
  """Grouped bars: one group per score column, one bar per method (row)."""
  columns = list(next(iter(rows.values())))
  x = np.arange(len(columns))
  width = 0.8 / len(rows)
  fig, ax = plt.subplots(figsize=(2.6 + 1.8 * len(columns), 3.6))
  for i, (name, row) in enumerate(rows.items()):
    values = [100 * row[c] for c in columns]
    bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=name)
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
  ax.set_xticks(x, columns)
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 105)
  return _finish(fig, ax, title, path)


def curves(
    t: np.ndarray, lines: dict[str, np.ndarray], path: str | pathlib.Path, title: str, ylabel: str,
    xlabel: str = "t  (0: model A, 1: model B aligned to A)",
) -> pathlib.Path:
  """One line per name over t; names ending in "+ repair" are dashed."""
  fig, ax = plt.subplots(figsize=(6.4, 3.8))
  colors = {}
  for name, values in lines.items():
    base = name.removesuffix(" + repair")
    color = colors.setdefault(base, f"C{len(colors)}")
    ax.plot(t, values, "--" if name != base else "-", color=color, marker="o", ms=3, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  return _finish(fig, ax, title, path)
