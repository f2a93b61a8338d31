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
front's convex part.

Bayesian MAP (`map_bayesian`, the paper's adaptive sampling) spends the
evaluations in rounds: after a uniform first round, each round fits the
surrogates, scores every angular cell of the coefficients' directions by
the surrogates' squared error there (mean + tradeoff * std, an upper
confidence bound), and draws the next round's merges from the softmax of
those scores (`map_sampling_probabilities`, `map_sample`). As in the
authors' `bayesian_pipeline`, cells are bins of the hyperspherical angles in
the non-negative orthant and radii are drawn uniformly in a range; unlike
it, the scores are divided by their largest before the temperature (the
temperature does not depend on the losses' scale), an empty cell scores as
the worst sampled one (theirs never samples it), the std is the errors'
own (theirs: the spread of their mean over random 80% subsets), and every
round's samples are kept and refitted.

Nested MAP (`map_nested`) merges T tasks by T - 1 two-task fronts: the two
groups of closest scores are merged by the front point their summed
preferences choose, as in the authors' `run_MAP_nested` (their scores are
accuracies; here losses, lower is better).
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


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


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
  num_tasks, divisions = _check_count("num_tasks", num_tasks), _check_count("divisions", divisions)
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


# Bayesian MAP: adaptive sampling of the coefficients by the surrogates' error per direction.


class AdaptiveSamples(NamedTuple):
  """The merges Bayesian MAP evaluated: S coefficient vectors, their losses, and the round of each."""

  coefficients: np.ndarray  # f64[S, n]
  losses: np.ndarray  # f64[S, T]
  rounds: np.ndarray  # i64[S], 0 for the first (uniform) round


def _check_interval(name: str, interval: Any, low_min: float) -> tuple[float, float]:
  try:
    low, high = (float(v) for v in interval)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be (low, high), got {interval!r}") from None
  if not (math.isfinite(low) and math.isfinite(high) and low_min <= low < high):
    floor = f" and low >= {low_min}" if math.isfinite(low_min) else ""
    raise ValueError(f"{name} must be finite with low < high{floor}, got {interval!r}")
  return low, high


def _generator(key: jax.Array) -> np.random.Generator:
  """A NumPy generator seeded by a JAX PRNG key's bits (host-side draws, nothing to compile)."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key), np.uint32).ravel())


def _angles(c: np.ndarray) -> np.ndarray:
  """f64[S, n - 1]: the hyperspherical angles of c: f[S, n], phi_k = atan2(|c_{k+1:}|, c_k), in [0, pi/2]
  for c >= 0."""
  tail = np.sqrt(np.cumsum(np.square(c[:, ::-1]), axis=1)[:, ::-1])
  return np.arctan2(tail[:, 1:], c[:, :-1])


def _cartesian(angles: np.ndarray, radius: np.ndarray) -> np.ndarray:
  """f64[S, n]: the points of hyperspherical angles f[S, n - 1] and radii f[S] (inverse of `_angles`)."""
  sines = np.cumprod(np.sin(angles), axis=1)
  leading = np.column_stack([np.ones(len(angles)), sines])  # prod_{i<k} sin(phi_i)
  trailing = np.column_stack([np.cos(angles), np.ones(len(angles))])
  return radius[:, None] * leading * trailing


def _bin_of(c: np.ndarray, bins: int) -> np.ndarray:
  """i64[S, n - 1]: each c's angular cell, bins cells of width pi / (2 bins) per angle."""
  return np.clip(np.floor(_angles(c) / (np.pi / 2) * bins), 0, bins - 1).astype(np.int64)


def map_sampling_probabilities(surrogates: QuadraticSurrogates, coefficients: Any, losses: Any, *, bins: int = 4,
                               tradeoff: float = 0.5, temperature: float = 0.07) -> np.ndarray:
  """Bayesian MAP's next sampling distribution over the directions of c (one round's update).

  The non-negative orthant of c: f[n] is cut into bins^(n - 1) cells of its
  hyperspherical angles phi_k = atan2(|c_{k+1:}|, c_k) in [0, pi/2] (negative
  entries fall in the edge cells). Each evaluated c has the surrogates'
  squared error e = sum_j (Q_j(c) - L_j(c))^2; a cell's acquisition score is
  mean(e) + tradeoff * std(e) over its samples (an upper confidence bound on
  the surrogates' error there), an empty cell's is the largest cell's, and
  the probabilities are softmax(score / (max score * temperature)), uniform
  when every error is 0 (at most (1e-10 max(1, |losses|))^2: rounding).

  Args:
    surrogates: the surrogates fitted to (coefficients, losses).
    coefficients: c: f[S, n], n >= 2, the evaluated merges.
    losses: f[S, T], their losses.
    bins: cells per angle.
    tradeoff: the weight of the errors' spread against their mean.
    temperature: > 0; small concentrates the samples in the worst cells.

  Returns:
    f64[bins, ..., bins] (n - 1 axes, cell (i_0, ..., i_{n-2}) holds phi_k in
    [i_k, i_k + 1) pi / (2 bins)), summing to 1.
  """
  c = _check_matrix("coefficients", coefficients)
  y = _check_matrix("losses", losses)
  n = c.shape[1]
  if n < 2:
    raise ValueError(f"adaptive sampling bins the directions of c; it needs n >= 2 coefficients, got {n}")
  if y.shape != (len(c), surrogates.linear.shape[0]):
    raise ValueError(f"losses have shape {y.shape}; expected ({len(c)}, {surrogates.linear.shape[0]}):"
                     " one row per coefficient vector and one column per surrogate")
  bins = _check_count("bins", bins)
  if not (math.isfinite(tradeoff) and tradeoff >= 0):
    raise ValueError(f"tradeoff must be finite and >= 0, got {tradeoff!r}")
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
  errors = np.sum(np.square(map_predict(surrogates, c) - y), axis=1)
  cells = np.ravel_multi_index(tuple(_bin_of(c, bins).T), (bins,) * (n - 1))
  scores = np.full(bins ** (n - 1), np.nan)
  for cell in np.unique(cells):
    e = errors[cells == cell]
    scores[cell] = e.mean() + tradeoff * e.std()
  scores = np.where(np.isnan(scores), np.nanmax(scores), scores)
  top = scores.max()
  rounding = (1e-10 * max(1.0, float(np.abs(y).max()))) ** 2  # an exact fit's errors are rounding
  logits = scores / (top * temperature) if top > rounding else np.zeros_like(scores)
  probabilities = np.exp(logits - logits.max())
  return (probabilities / probabilities.sum()).reshape((bins,) * (n - 1))


def map_sample(key: jax.Array, probabilities: Any, num_samples: int, *, radius=(0.2, 0.8)) -> np.ndarray:
  """f64[num_samples, n]: coefficient vectors drawn cell by cell from `map_sampling_probabilities`.

  Each sample's cell is drawn from `probabilities` (f[bins, ..., bins],
  n - 1 axes), its angles uniformly within the cell, and its radius |c|
  uniformly in `radius`, so every c is >= 0. Uniform probabilities are
  Bayesian MAP's first round. Deterministic in `key` (NumPy draws seeded by
  its bits).
  """
  p = np.asarray(probabilities, np.float64)
  if p.ndim < 1 or len(set(p.shape)) != 1 or p.shape[0] < 1:
    raise ValueError(f"probabilities must have one axis of bins per angle, all of one length, got shape {p.shape}")
  if not (np.all(np.isfinite(p)) and np.all(p >= 0) and abs(p.sum() - 1) < 1e-6):
    raise ValueError("probabilities must be non-negative and sum to 1")
  num_samples = _check_count("num_samples", num_samples)
  low, high = _check_interval("radius", radius, 0.0)
  bins = p.shape[0]
  rng = _generator(key)
  cells = rng.choice(p.size, num_samples, p=p.ravel() / p.sum())
  offsets = rng.uniform(size=(num_samples, p.ndim))
  angles = (np.column_stack(np.unravel_index(cells, p.shape)) + offsets) * (np.pi / 2 / bins)
  return _cartesian(angles, rng.uniform(low, high, num_samples))


def map_bayesian(evaluate: Callable[[np.ndarray], Any], key: jax.Array, num_coefficients: int,
                 schedule: Sequence[int], *, bins: int = 4, radius=(0.2, 0.8), tradeoff: float = 0.5,
                 temperature: float = 0.07) -> AdaptiveSamples:
  """Bayesian MAP: rounds of evaluations, each sampled where the surrogates fit worst so far.

  Round 0 evaluates schedule[0] coefficient vectors drawn uniformly over the
  angular cells (`map_sample`); every later round r fits the surrogates to
  all the evaluations so far (`map_surrogates`), turns their errors into
  `map_sampling_probabilities`, and evaluates schedule[r] new vectors drawn
  from them. Fit the final surrogates and their front on the result:

      samples = mj.merge.map_bayesian(evaluate, key, n, (30, 10, 10))
      surrogates = mj.merge.map_surrogates(samples.coefficients, samples.losses)

  Args:
    evaluate: c f64[S, n] -> losses f[S, T] (e.g. `map_losses` with its other
      arguments bound), called once per round.
    key: a JAX PRNG key; the same key gives the same samples.
    num_coefficients: n >= 2.
    schedule: evaluations per round; schedule[0] >= (n + 1)(n + 2) / 2, the
      terms of a quadratic.
    bins, tradeoff, temperature: see `map_sampling_probabilities`.
    radius: (low, high), the range of |c| (see `map_sample`).

  Returns:
    `AdaptiveSamples` of sum(schedule) evaluations.
  """
  n = _check_count("num_coefficients", num_coefficients, 2)
  schedule = list(schedule)
  if not schedule:
    raise ValueError("schedule must hold at least one round")
  for r, size in enumerate(schedule):
    _check_count(f"schedule[{r}]", size)
  terms = (n + 1) * (n + 2) // 2
  if schedule[0] < terms:
    raise ValueError(f"schedule[0] = {schedule[0]}: a quadratic in {n} coefficients has {terms} terms, so the"
                     f" first round must evaluate at least {terms}")
  bins = _check_count("bins", bins)
  _check_interval("radius", radius, 0.0)
  probabilities = np.full((bins,) * (n - 1), 1.0 / bins ** (n - 1))
  coefficients, losses, rounds = np.zeros((0, n)), None, []
  for r, (size, round_key) in enumerate(zip(schedule, jax.random.split(key, len(schedule)))):
    if r:
      surrogates = map_surrogates(coefficients, losses)
      probabilities = map_sampling_probabilities(surrogates, coefficients, losses, bins=bins, tradeoff=tradeoff,
                                                 temperature=temperature)
    new = map_sample(round_key, probabilities, size, radius=radius)
    new_losses = np.asarray(evaluate(new), np.float64)
    if new_losses.ndim != 2 or len(new_losses) != size or (losses is not None and
                                                             new_losses.shape[1] != losses.shape[1]):
      raise ValueError(f"evaluate returned shape {new_losses.shape} for {size} coefficient vectors; expected"
                       f" ({size}, T) with one column per task, the same T every round")
    coefficients = np.concatenate([coefficients, new])
    losses = new_losses if losses is None else np.concatenate([losses, new_losses])
    rounds += [r] * size
  return AdaptiveSamples(coefficients, losses, np.array(rounds, np.int64))


# Nested MAP: pairwise fronts merged hierarchically.


class NestedStep(NamedTuple):
  """One pairwise merge of nested MAP: two groups of tasks, their front, and the point chosen on it."""

  groups: tuple[tuple[int, ...], tuple[int, ...]]  # the tasks of the two groups merged
  front: ParetoFront  # in the pair's coefficients (a, b); losses: each group's preference-weighted loss
  chosen: int  # the front point of least preference-weighted predicted loss
  coefficients: np.ndarray  # f64[T], the merged group's coefficient on every task vector


class NestedMerge(NamedTuple):
  """Nested MAP's result: the merge's coefficient per task vector and its T - 1 pairwise steps."""

  coefficients: np.ndarray  # f64[T]
  steps: list[NestedStep]
  evaluations: int  # the merges `evaluate` scored: T + (T - 1)(samples + 1)


def map_nested(evaluate: Callable[[np.ndarray], Any], key: jax.Array, num_tasks: int, *, samples: int,
               divisions: int = 10, preferences: Any = None, bounds=(0.0, 1.0)) -> NestedMerge:
  """Nested MAP: merges T task models pairwise, each pair by a two-task MAP front (divide and conquer).

  Every group of tasks is a merged model theta = base + sum_i u_i tau_i
  (first one group per task, u = e_i, the fine-tuned model) with a score, its
  preference-weighted mean loss over its tasks (first each model's loss on
  its own task). Until one group is left, the two groups of closest scores
  (the first such pair) are merged: `samples` pair coefficients (a, b) are
  drawn uniformly in the box `bounds`, the merges a u_A + b u_B evaluated,
  each group's objective is its preference-weighted mean loss, a quadratic
  surrogate per group gives the pair's front (`map_pareto_front`, preferences
  `map_preferences(2, divisions)`, within `bounds`), and the front point of
  least (P_A Q_A + P_B Q_B) / (P_A + P_B), P a group's summed preferences,
  becomes the merged group u = a u_A + b u_B (evaluated once for its score),
  which joins the others last. Only 2-D fronts are fitted, each from a few
  samples, however many tasks there are.

  Args:
    evaluate: c f64[S, T] -> losses f[S, T] (coefficient i scales task
      vector i; loss j is task j's), e.g. `map_losses` with its other
      arguments bound.
    key: a JAX PRNG key; the same key gives the same merge.
    num_tasks: T >= 2.
    samples: pair coefficients evaluated per merge, >= 6 (a quadratic in two).
    divisions: the preference grid of each pair's front.
    preferences: f[T] > 0, each task's weight (None: equal).
    bounds: (low, high), the box of each pair's (a, b).

  Returns:
    `NestedMerge`.
  """
  num_tasks = _check_count("num_tasks", num_tasks, 2)
  samples = _check_count("samples", samples, 6)
  divisions = _check_count("divisions", divisions)
  low, high = _check_interval("bounds", bounds, -math.inf)
  p = np.ones(num_tasks) if preferences is None else np.asarray(preferences, np.float64)
  if p.shape != (num_tasks,) or not (np.all(np.isfinite(p)) and np.all(p > 0)):
    raise ValueError(f"preferences must be {num_tasks} finite values > 0, got {preferences!r}")

  def scored(c):
    out = np.asarray(evaluate(c), np.float64)
    if out.shape != (len(c), num_tasks):
      raise ValueError(f"evaluate returned shape {out.shape} for {len(c)} coefficient vectors; expected"
                       f" ({len(c)}, {num_tasks}): one loss per task")
    return out

  def objective(losses, tasks):
    return losses[:, list(tasks)] @ p[list(tasks)] / p[list(tasks)].sum()

  own = scored(np.eye(num_tasks))
  groups = [((i,), np.eye(num_tasks)[i], own[i, i]) for i in range(num_tasks)]
  evaluations, steps = num_tasks, []
  grid = map_preferences(2, divisions)
  for pair_key in jax.random.split(key, num_tasks - 1):
    _, i, j = min((abs(groups[i][2] - groups[j][2]), i, j)
                  for i in range(len(groups)) for j in range(i + 1, len(groups)))
    (tasks_a, u_a, _), (tasks_b, u_b, _) = groups[i], groups[j]
    groups = [g for k, g in enumerate(groups) if k not in (i, j)]
    ab = _generator(pair_key).uniform(low, high, (samples, 2))
    losses = scored(ab[:, :1] * u_a + ab[:, 1:] * u_b)
    pair = np.column_stack([objective(losses, tasks_a), objective(losses, tasks_b)])
    front = map_pareto_front(map_surrogates(ab, pair), grid, bounds=(low, high))
    weights = np.array([p[list(tasks_a)].sum(), p[list(tasks_b)].sum()])
    chosen = int(np.argmin(front.losses @ weights))
    a, b = front.coefficients[chosen]
    u = a * u_a + b * u_b
    tasks = tasks_a + tasks_b
    score = objective(scored(u[None]), tasks)[0]
    evaluations += samples + 1
    steps.append(NestedStep((tasks_a, tasks_b), front, chosen, u))
    groups.append((tasks, u, score))
  return NestedMerge(groups[0][1], steps, evaluations)
