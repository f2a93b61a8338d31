"""MAP: quadratic surrogates of each task's loss in the merge coefficients, and their Pareto front.

Li, Zhang, Yang, Zhang, Liu, Xu, Tian, Sun, Chen and Xie (2024), "MAP:
Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation", arXiv 2406.07529, and its code (`luli-git/MAP`, `MAP.py`).

    losses = mj.merge.map_losses(loss_fn, base, task_vectors, coefficients, data)
    surrogates = mj.merge.map_surrogates(coefficients, losses)
    front = mj.merge.map_pareto_front(surrogates, mj.merge.map_preferences(2, 10))

The merged model of coefficients c: f[n] is task arithmetic,
theta(c) = base + sum_i c_i tau_i. MAP evaluates every task's loss
L_j(theta(c)) at a few sampled c (`map_losses`: S models, each scored on
every task's batches), fits per task a quadratic

    Q_j(c) = a_j + b_j . c + c^T A_j c      (A_j symmetric)

by linear least squares on the (n + 1)(n + 2) / 2 monomials 1, c_i,
c_i c_k (i <= k) (`map_surrogates`, float64, closed form: the S x M design's
`lstsq`), and amortises the search for good merges over the surrogates: each
preference w on the simplex (`map_preferences`: every w with entries
k / divisions) gives the weighted-sum problem min_c sum_j w_j Q_j(c), whose
minimisers are Pareto optimal for the surrogates (for w > 0), and the points
no other point dominates form the front (`map_pareto_front`). Unbounded, the
minimiser is closed form, c = -(2 H)^-1 g with H = sum_j w_j A_j (positive
definite, else a ValueError) and g = sum_j w_j b_j; within a box
`bounds=(low, high)` it is SciPy's L-BFGS-B from the box's centre with the
exact gradient (on the host; a local minimum where the weighted surrogate is
not convex).

Differences from the authors' code: it fits the quadratic through an
activation (a sigmoid for accuracies, a softplus for losses) with
`scipy.optimize.curve_fit` and searches the front with NSGA-III (DEAP) in
[-3, 3]^n; here the surrogate is the plain quadratic of the paper's
approximation (a closed-form fit, and closed-form or convex minimisers for
convex fits), and the front comes from weighted sums, which find only the
front's convex part. Its Bayesian adaptive sampling and nested merging are
not implemented.
"""

from collections.abc import Callable, Sequence
import functools
import itertools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from mergejax import tree

PyTree = Any


class QuadraticSurrogates(NamedTuple):
  """Q_j(c) = constant[j] + linear[j] . c + c^T quadratic[j] c for T tasks, c: f[n]."""

  constant: np.ndarray  # f64[T]
  linear: np.ndarray  # f64[T, n]
  quadratic: np.ndarray  # f64[T, n, n], symmetric


class ParetoFront(NamedTuple):
  """The non-dominated weighted-sum minimisers, m points sorted by the first task's predicted loss."""

  coefficients: np.ndarray  # f64[m, n]
  losses: np.ndarray  # f64[m, T], the surrogates' predictions there
  preferences: np.ndarray  # f64[m, T], the weights w each point minimises sum_j w_j Q_j for


def _monomials(c: np.ndarray) -> np.ndarray:
  """f64[S, M]: 1, c_i, then c_i c_k for i <= k (row-major), M = (n + 1)(n + 2) / 2."""
  n = c.shape[1]
  pairs = [c[:, i] * c[:, k] for i in range(n) for k in range(i, n)]
  return np.column_stack([np.ones(len(c)), c, *pairs])


def _check_matrix(name: str, x: Any) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or 0 in x.shape:
    raise ValueError(f"{name} must be a non-empty 2-D array, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} has {int(np.sum(~np.isfinite(x)))} non-finite values")
  return x


def map_surrogates(coefficients: Any, losses: Any) -> QuadraticSurrogates:
  """Fits each task's quadratic surrogate by least squares (closed form, float64).

  Args:
    coefficients: c: f[S, n], the sampled merge coefficients.
    losses: f[S, T], each task's loss (or any metric to minimise) at each c.

  Returns:
    `QuadraticSurrogates`; an exact quadratic is recovered exactly (to
    rounding) from any S >= (n + 1)(n + 2) / 2 points in general position.
  """
  c = _check_matrix("coefficients", coefficients)
  y = _check_matrix("losses", losses)
  if len(c) != len(y):
    raise ValueError(f"coefficients has {len(c)} rows but losses has {len(y)}")
  n = c.shape[1]
  design = _monomials(c)
  size = design.shape[1]
  if len(c) < size:
    raise ValueError(f"a quadratic in {n} coefficients has {size} terms: it needs at least {size} samples,"
                     f" got {len(c)}")
  rank = np.linalg.matrix_rank(design)
  if rank < size:
    raise ValueError(f"the {len(c)} samples determine only {rank} of the quadratic's {size} terms: sample"
                     " coefficient vectors in general position (e.g. uniformly in a box)")
  weights, *_ = np.linalg.lstsq(design, y, rcond=None)  # f64[M, T]
  weights = weights.T
  quadratic = np.zeros((y.shape[1], n, n))
  column = 1 + n
  for i in range(n):
    for k in range(i, n):
      if i == k:
        quadratic[:, i, i] = weights[:, column]
      else:
        quadratic[:, i, k] = quadratic[:, k, i] = weights[:, column] / 2
      column += 1
  return QuadraticSurrogates(weights[:, 0], weights[:, 1:1 + n], quadratic)


def map_predict(surrogates: QuadraticSurrogates, coefficients: Any) -> np.ndarray:
  """f64[S, T]: every surrogate at every c: f[S, n]."""
  c = _check_matrix("coefficients", coefficients)
  if c.shape[1] != surrogates.linear.shape[1]:
    raise ValueError(f"coefficients have {c.shape[1]} entries; the surrogates take {surrogates.linear.shape[1]}")
  return (surrogates.constant[None] + c @ surrogates.linear.T
          + np.einsum("si,tik,sk->st", c, surrogates.quadratic, c))


def map_preferences(num_tasks: int, divisions: int) -> np.ndarray:
  """f64[P, T]: every weight vector on the simplex with entries k / divisions (Das and Dennis).

  P = C(divisions + T - 1, T - 1), in lexicographic order of the first
  task's weight descending; the corners (one task only) are included.
  """
  for name, value in (("num_tasks", num_tasks), ("divisions", divisions)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  points = [p for p in itertools.product(range(divisions, -1, -1), repeat=num_tasks) if sum(p) == divisions]
  return np.array(points, np.float64) / divisions


def _check_bounds(bounds, n: int) -> tuple[np.ndarray, np.ndarray] | None:
  if bounds is None:
    return None
  try:
    low, high = bounds
  except (TypeError, ValueError):
    raise ValueError(f"bounds must be (low, high), got {bounds!r}") from None
  low = np.broadcast_to(np.asarray(low, np.float64), (n,)).copy()
  high = np.broadcast_to(np.asarray(high, np.float64), (n,)).copy()
  if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(low < high)):
    raise ValueError(f"bounds must be finite with low < high in every coefficient, got {low} and {high}")
  return low, high


def _non_dominated(losses: np.ndarray) -> np.ndarray:
  """bool[P]: the rows no other row dominates (<= everywhere, < somewhere); of equal rows, the first."""
  keep = np.ones(len(losses), bool)
  for p, row in enumerate(losses):
    others = np.delete(np.arange(len(losses)), p)
    dominated = np.all(losses[others] <= row, axis=1) & np.any(losses[others] < row, axis=1)
    earlier_equal = np.all(losses[:p] == row, axis=1)
    keep[p] = not (dominated.any() or earlier_equal.any())
  return keep


def map_pareto_front(surrogates: QuadraticSurrogates, preferences: Any, *, bounds=None) -> ParetoFront:
  """The surrogates' Pareto front from weighted sums (see the module docstring).

  Args:
    surrogates: T quadratic surrogates in n coefficients (`map_surrogates`).
    preferences: w: f[P, T], non-negative rows summing to 1 (`map_preferences`).
    bounds: None (unconstrained: every weighted quadratic must be positive
      definite) or `(low, high)`, scalars or f[n], the box c is kept in.

  Returns:
    `ParetoFront`: the minimisers no other minimiser dominates, with their
    predicted losses and preferences, sorted by the first task's loss.
  """
  w = _check_matrix("preferences", preferences)
  num_tasks, n = surrogates.linear.shape
  if w.shape[1] != num_tasks:
    raise ValueError(f"preferences have {w.shape[1]} columns; there are {num_tasks} surrogates")
  if np.any(w < 0) or not np.allclose(w.sum(1), 1, rtol=0, atol=1e-9):
    raise ValueError("preferences must be non-negative rows summing to 1 (weights on the simplex)")
  box = _check_bounds(bounds, n)
  solutions = []
  for p, weights in enumerate(w):
    hessian = 2 * np.einsum("t,tik->ik", weights, surrogates.quadratic)
    gradient0 = weights @ surrogates.linear
    if box is None:
      if np.linalg.eigvalsh(hessian)[0] <= 0:
        raise ValueError(f"preferences[{p}] = {weights}: the weighted surrogate is not positive definite, so it"
                         " has no minimiser; pass bounds=(low, high)")
      solutions.append(np.linalg.solve(hessian, -gradient0))
    else:
      objective = lambda c, h=hessian, g=gradient0: (0.5 * c @ h @ c + g @ c, h @ c + g)
      result = scipy.optimize.minimize(objective, (box[0] + box[1]) / 2, jac=True, method="L-BFGS-B",
                                       bounds=list(zip(*box)), options={"ftol": 1e-15, "gtol": 1e-12})
      solutions.append(result.x)
  c = np.array(solutions)
  losses = map_predict(surrogates, c)
  keep = _non_dominated(losses)
  order = np.argsort(losses[keep, 0], kind="stable")
  return ParetoFront(c[keep][order], losses[keep][order], w[keep][order])


@jax.jit
def _merged(base: PyTree, task_vectors: Sequence[PyTree], c: jax.Array) -> PyTree:
  """base + sum_i c_i tau_i, in float32, each leaf in base's dtype."""
  def leaf(b, *taus):
    total = b.astype(jnp.float32) + sum(c[i] * t.astype(jnp.float32) for i, t in enumerate(taus))
    return total.astype(b.dtype)
  return jax.tree.map(leaf, base, *task_vectors)


@functools.lru_cache(maxsize=8)
def _jitted(loss_fn):
  """jax.jit(loss_fn), kept: calls with one loss_fn compile once per batch shape."""
  return jax.jit(loss_fn)


def map_losses(loss_fn: Callable[[PyTree, Any], jax.Array], base: PyTree, task_vectors: Sequence[PyTree],
               coefficients: Any, data: Sequence[Sequence[Any]]) -> np.ndarray:
  """f64[S, T]: task j's mean loss over data[j] of base + sum_i c_i tau_i, at each sampled c.

  Args:
    loss_fn: (variables, batch) -> f32[], jit-compiled once per batch shape
      (kept for the 8 most recent functions: pass the same object again).
    base: the pre-trained model.
    task_vectors: n task vectors tau_i, shaped like base.
    coefficients: c: f[S, n].
    data: T non-empty sequences of batches, one per task.
  """
  c = _check_matrix("coefficients", coefficients)
  task_vectors = list(task_vectors)
  if c.shape[1] != len(task_vectors):
    raise ValueError(f"coefficients have {c.shape[1]} entries but there are {len(task_vectors)} task vectors")
  for i, tau in enumerate(task_vectors):
    try:
      tree.check_same_shapes(base, tau)
    except ValueError as e:
      raise ValueError(f"task_vectors[{i}] does not match base: {e}") from None
  data = [list(batches) for batches in data]
  if not data or not all(data):
    raise ValueError("data must hold one non-empty sequence of batches per task")
  loss = _jitted(loss_fn)
  out = np.zeros((len(c), len(data)))
  for s, row in enumerate(c):
    merged = _merged(base, task_vectors, jnp.asarray(row, jnp.float32))
    for j, batches in enumerate(data):
      out[s, j] = math.fsum(float(loss(merged, b)) for b in batches) / len(batches)
  return out
