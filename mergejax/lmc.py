"""Linear mode connectivity: a metric along the path between two models.

    curve = mj.lmc.interpolate(eval_fn, va, vb_aligned, num=11)
    mj.lmc.barrier(curve, "loss")

`eval_fn(variables)` returns a scalar or a dict of scalars (loss, accuracy);
it runs on the host, once per point, and may loop over a whole dataset.
`transform(variables, t)`, if given, is applied to each interpolated model
before it is evaluated (batch-norm reset, REPAIR).
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from mergejax import tree

PyTree = Any


class Curve(NamedTuple):
  """A metric along `(1 - t) va + t vb`.

  Attributes:
    t: f64[num], from 0 (va) to 1 (vb).
    values: metric name -> f64[num] (the name "value" for a scalar eval_fn).
  """

  t: np.ndarray
  values: dict[str, np.ndarray]


def interpolate(
    eval_fn: Callable[[PyTree], Any],
    va: PyTree,
    vb: PyTree,
    num: int = 11,
    *,
    transform: Callable[[PyTree, float], PyTree] | None = None,
) -> Curve:
  """Evaluates `eval_fn` at `num` evenly spaced points from va to vb."""
  if num < 2:
    raise ValueError(f"num must be at least 2, got {num}")
  tree.check_same_structure(va, vb)
  tree.check_same_shapes(va, vb)
  ts = np.linspace(0.0, 1.0, num)
  lerp = jax.jit(tree.lerp)
  rows = []
  for t in ts:
    variables = lerp(va, vb, t)
    if transform is not None:
      variables = transform(variables, float(t))
    result = eval_fn(variables)
    rows.append(dict(result) if isinstance(result, Mapping) else {"value": result})
  names = list(rows[0])
  return Curve(ts, {k: np.array([float(r[k]) for r in rows]) for k in names})


def barrier(curve: Curve, metric: str | None = None) -> float:
  """Git Re-Basin's barrier: max_t L(theta_t) - [(1 - t) L_A + t L_B].

  Args:
    curve: from `interpolate`.
    metric: the value to use; may be omitted when the curve has one.

  Returns:
    The largest rise of the metric above the straight line between its end
    points (0 for a convex curve; for an accuracy, pass its negation or the
    error rate).
  """
  if metric is None:
    if len(curve.values) != 1:
      raise ValueError(f"the curve has several metrics {sorted(curve.values)}; name one")
    (metric,) = curve.values
  if metric not in curve.values:
    raise ValueError(f"no metric {metric!r} in the curve; it has {sorted(curve.values)}")
  v = np.asarray(curve.values[metric], np.float64)
  line = (1 - curve.t) * v[0] + curve.t * v[-1]
  return float(np.max(v - line))
