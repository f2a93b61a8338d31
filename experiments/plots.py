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


def bars_and_sweeps(
    bars: dict[str, tuple[float, float]],
    sweeps: dict[str, tuple[str, np.ndarray, dict[str, np.ndarray]]],
    path: str | pathlib.Path, title: str, ylabel: str, references: dict[str, float] | None = None,
) -> pathlib.Path:
  """A bar per name (mean ± std) on top, and a panel per sweep below.

  Args:
    bars: name -> (mean, std), in [0, 1] (drawn in percent).
    sweeps: panel title -> (x label, x: f[n], {line name: f[n]}).
    path: the PNG to write.
    title: the figure's title.
    ylabel: what the bars and lines measure.
    references: name -> a value drawn as a dotted line in every sweep panel.
  """
  cols = min(4, max(1, len(sweeps)))
  rows = 1 + -(-len(sweeps) // cols)
  fig = plt.figure(figsize=(3.4 * cols + 1.0, 3.4 * rows))
  grid = fig.add_gridspec(rows, cols)
  ax = fig.add_subplot(grid[0, :])
  names = list(bars)
  bar = ax.bar(np.arange(len(names)), [100 * bars[n][0] for n in names],
               yerr=[100 * bars[n][1] for n in names], color=[f"C{i % 10}" for i in range(len(names))])
  ax.bar_label(bar, fmt="%.1f", fontsize=7)
  ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel(f"{ylabel} (%)")
  lowest = min(100 * (mean - std) for mean, std in bars.values())
  ax.set_ylim(max(0.0, np.floor(lowest / 5) * 5 - 5), 101)  # Zoomed: the bars differ by points.
  ax.set_title(title)
  for i, (name, (xlabel, x, lines)) in enumerate(sweeps.items()):
    ax = fig.add_subplot(grid[1 + i // cols, i % cols])
    for label, values in lines.items():
      ax.plot(x, 100 * np.asarray(values), marker="o", ms=3, label=label)
    for k, (label, value) in enumerate((references or {}).items()):
      ax.axhline(100 * value, color=f"C{len(lines) + k}", ls=":", label=label)
    if np.all(np.asarray(x) > 0) and np.max(x) / np.min(x) > 100:
      ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel} (%)")
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def pareto_front(
    sampled: np.ndarray, predicted: np.ndarray, actual: np.ndarray, path: str | pathlib.Path, title: str,
    labels: tuple[str, str], adaptive: tuple[np.ndarray, np.ndarray] | None = None,
) -> pathlib.Path:
  """Two tasks' losses: sampled merges, a surrogate's Pareto front, and the front's merges evaluated.

  Args:
    sampled: f[S, 2], the losses of the merges the surrogates were fitted on.
    predicted: f[m, 2], the surrogates' front (drawn as a line in order).
    actual: f[m, 2], the true losses at the front's coefficients.
    path: the PNG to write.
    title: the figure's title.
    labels: the two tasks' names (the x and y axes).
    adaptive: None, or (sampled f[S', 2], predicted f[m', 2]) of a second
      front from adaptively sampled merges (Bayesian MAP), drawn beside.
  """
  fig, ax = plt.subplots(figsize=(5.6, 4.2))
  ax.scatter(sampled[:, 0], sampled[:, 1], s=12, color="0.6", label="sampled merges (evaluated)")
  ax.plot(predicted[:, 0], predicted[:, 1], "-o", ms=3, color="C0", label="Pareto front (surrogates)")
  ax.plot(actual[:, 0], actual[:, 1], "x", color="C3", label="front's merges (evaluated)")
  if adaptive is not None:
    ax.scatter(adaptive[0][:, 0], adaptive[0][:, 1], s=12, marker="^", color="C2",
               label="adaptively sampled merges (Bayesian MAP)")
    ax.plot(adaptive[1][:, 0], adaptive[1][:, 1], "--", color="C2", label="Pareto front (Bayesian MAP)")
  ax.set_xlabel(f"{labels[0]} loss")
  ax.set_ylabel(f"{labels[1]} loss")
  return _finish(fig, ax, title, path)
