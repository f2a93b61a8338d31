"""Metrics-weighted averaging (Choi & Yu, "Parameter-Efficient Checkpoint
Merging via Metrics-Weighted Averaging", arXiv 2504.18580).

A weighted average of models (`mj.merge.average`) whose weights come from one
metric per model, such as its final training loss (lower is better) or its
number of training steps (higher is better), sharpened by a penalty factor p:

    merged = mj.merge.metric_weighted_average(models, losses, penalty=2.0)
    merged = mj.merge.metric_weighted_average(
        models, steps, penalty=1.0, lower_is_better=False)

    w_i = m_i ** -p / sum_j m_j ** -p    (lower is better)
    w_i = m_i ** p / sum_j m_j ** p      (higher is better)

p = 0 is the plain average and a large p puts all the weight on the best
model. The weights depend only on the metrics, so the average is per leaf.
"""

from collections.abc import Sequence
import math
from typing import Any

import numpy as np

from mergejax.merge.average import average
from mergejax.merge.average import check_models

PyTree = Any


def _check_metrics(metrics: Sequence[float], num: int) -> np.ndarray:
  """f64[N]: the metrics, after checking there are N, finite and > 0."""
  m = np.asarray(metrics, np.float64)
  if m.shape != (num,):
    raise ValueError(f"metrics: {num} models but metrics of shape {m.shape}")
  if not np.all(np.isfinite(m) & (m > 0)):
    raise ValueError(f"metrics must be finite and > 0, got {m.tolist()}")
  return m


def _check_penalty(penalty: float) -> float:
  if not 0 <= penalty < math.inf:
    raise ValueError(f"penalty must be finite and >= 0, got {penalty}")
  return float(penalty)


def metric_weights(
    metrics: Sequence[float], *, penalty: float, lower_is_better: bool = True
) -> np.ndarray:
  """The models' averaging weights from their metrics (see the module).

  w_i is proportional to m_i ** -p (lower is better) or m_i ** p (higher is
  better), computed as exp(+-p (log m_i - log m_best)) so that a large p
  does not overflow.

  Args:
    metrics: N finite metrics > 0, one per model.
    penalty: p, finite and >= 0.
    lower_is_better: whether a smaller metric marks a better model (a loss)
      or a larger one (a step count, an accuracy).

  Returns:
    f32[N], non-negative and summing to 1.

  Raises:
    ValueError: no metric, a non-finite or non-positive metric, or a
      negative or non-finite penalty.
  """
  m = np.asarray(metrics, np.float64)
  if m.ndim != 1 or m.size == 0:
    raise ValueError(f"metrics: need a non-empty list, got shape {m.shape}")
  m = _check_metrics(m, m.size)
  penalty = _check_penalty(penalty)
  sign = -1.0 if lower_is_better else 1.0
  log_m = np.log(m)
  best = log_m.min() if lower_is_better else log_m.max()
  w = np.exp(sign * penalty * (log_m - best))
  return (w / w.sum()).astype(np.float32)


def metric_weighted_average(
    models: Sequence[PyTree],
    metrics: Sequence[float],
    *,
    penalty: float = 1.0,
    lower_is_better: bool = True,
) -> PyTree:
  """Metrics-weighted averaging: `average(models, metric_weights(...))`.

  Args:
    models: N >= 1 models of the same structure and leaf shapes (checkpoints
      of one run, or models fine-tuned from one base).
    metrics: N finite metrics > 0, one per model.
    penalty: p, finite and >= 0; 0 is the plain average.
    lower_is_better: whether a smaller metric marks a better model.

  Returns:
    The weighted mean, in the leaf dtypes of `models[0]`.

  Raises:
    ValueError: no model, mismatched trees (naming the leaf path), a metric
      count other than N, or bad metrics or penalty (see `metric_weights`).
  """
  models = check_models(models)
  _check_metrics(metrics, len(models))
  weights = metric_weights(metrics, penalty=penalty, lower_is_better=lower_is_better)
  return average(models, weights)
