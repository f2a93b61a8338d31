"""FW-merging: Frank-Wolfe over the convex hull of fine-tuned models.

Chen, Hu, Luk, Hospedales and Fan, "FW-Merging: Scaling Model Merging with
Frank-Wolfe Optimization", arXiv 2503.12649 (2025); read with FusionBench's
`fusion_bench/method/fw_merging/fw_hard.py` and `fw_soft.py`
(`FrankWolfeHardAlgorithm`, `FrankWolfeSoftAlgorithm`), which the paper's
repository points to for its vision experiments.

    merged, trace = mj.merge.fw_merge(loss_fn, base, task_vectors, data, steps=10)

The fine-tuned models s_k = base + tau_k (tau_k the task vectors of `pool`)
span the constraint set C = conv{s_k}, and the objective is the tasks'
summed loss f(theta) = sum_j mean_b loss_fn(theta, data[j][b]) on a few
labelled training batches of each task. From theta_0 (`init`, default the
base), step t = 0, 1, ...:

1. g_t = grad f(theta_t) (one pass over `data`);
2. the linear minimisation oracle (`fw_select`) picks the vertex
   s = base + tau_k with k = argmin_k <g_t, tau_k> (`alignment="inner"`: the
   textbook oracle, argmin over C of <g_t, s>, since <g_t, base> is common to
   all), or k = argmin_k sum_leaves cos(g_t, tau_k) (`"cosine"`: FusionBench's
   per-tensor cosines, summed, so every leaf weighs alike);
3. theta_{t+1} = theta_t + gamma_t (s - theta_t), with gamma_t =
   `step_scale` * 2 / (t + 2) (`step_size="harmonic"`; FusionBench's
   `step_size` is our `step_scale`) or the gamma in [0, 1] minimising
   f(theta_t + gamma (s - theta_t)) (`"line_search"`: bisection on the
   sign of the directional derivative, a `jax.jvp` of the loss along
   s - theta_t, `line_search_iterations` halvings of [0, 1]).

The FW gap <g_t, theta_t - s> >= f(theta_t) - min_C f for convex f is
recorded per step, a certificate of how far theta_t can be from the best
point of C (none for non-convex losses).

`variant="soft"` is FW-Soft: each task j (in order) takes the gradient of
its own loss and picks its own vertex s_j, distinct from those the earlier
tasks picked at this step (at most K vertices, as FusionBench stops when the
pool is used up), and the step is the soft combination

    theta_{t+1} = theta_t + sum_j lambda_j (s_j - theta_t)

whose weights lambda are learned as AdaMerging learns task-arithmetic
coefficients (`mergejax.merge.adamerging`'s optimisation, with theta_t as
the base and the picked models as the fine-tuned ones; `soft` takes its
keywords: steps, learning_rate, init, granularity, blocks, clip,
optimizer), minimising the same f on the same data; `granularity="layer"`
learns one lambda per pick and leaf (or block). This is FusionBench's
`FrankWolfeSoftAlgorithm` with `merge_fn="adamerging"` and its
cross-entropy `ada_loss` (by default it learns the weights on the prediction
entropy of unlabelled inputs while its oracle reads the labelled loss; here
both read `loss_fn` and `data`); there is no step-size
rule, and as there (clamping off) the weights are not constrained, so a soft
step may leave C. When every vertex is picked (as many tasks as task
vectors), an exact soft step minimises f over the affine hull of theta_t and
the pool, which holds the hard step's segment: from one theta it ends no
higher than a hard step. With fewer tasks no such order holds.
FusionBench's hard merge starts from task arithmetic (pass it as `init`)
and adds the initial model to the pool.

Gradients are one jit-compiled `value_and_grad` of `loss_fn` per batch shape,
kept for the 8 most recent `loss_fn`s (pass the same function object to
merge again without compiling); the oracle and the update are jitted over
the whole tree; the loop and the line search run on the host. Every leaf
keeps its dtype.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import tree
from mergejax.merge.adamerging import _check_fit, _fit_to_objective, _merge_jit
from mergejax.merge import task_vectors as tv

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]

VARIANTS = ("hard", "soft")
SOFT_OPTIONS = frozenset({"steps", "learning_rate", "init", "granularity", "blocks", "clip", "optimizer"})
ALIGNMENTS = ("inner", "cosine")
STEP_SIZES = ("harmonic", "line_search")


class FWTrace(NamedTuple):
  """What `fw_merge` did, step by step (T steps).

  chosen: per step, the pool indices of the vertices moved toward (one for
    "hard", one per task that picked for "soft").
  step_sizes: f64[T], gamma_t; for "soft", the weights' sum sum_j lambda_j
    (mean over the columns layer-wise): the step toward their weighted mean.
  losses: f64[T + 1], f(theta_t) for t = 0..T (the last: the returned model).
  gaps: f64[T], the FW gap <g_t, theta_t - s_t>, s_t the oracle's vertex for
    the summed gradient g_t (the textbook certificate, for either variant).
  weights: per step, the weight of each chosen vertex's direction s_j -
    theta_t: f64[1] = [gamma_t] for "hard"; for "soft" the learned lambda,
    f64[J] task-wise, f64[J, G] layer-wise.
  """

  chosen: list[tuple[int, ...]]
  step_sizes: np.ndarray
  losses: np.ndarray
  gaps: np.ndarray
  weights: list[np.ndarray]


@jax.jit
def _inner_alignments(gradient: PyTree, pool: Sequence[PyTree]) -> jax.Array:
  """f32[K]: <g, tau_k> over the whole tree."""
  return jnp.stack([tree.vdot(gradient, tau) for tau in pool])


def _leaf_cosine(g: jax.Array, tau: jax.Array) -> jax.Array:
  """cos(g, tau) of one leaf in float32; 0 where either is zero."""
  g, tau = g.ravel().astype(jnp.float32), tau.ravel().astype(jnp.float32)
  norms = jnp.linalg.norm(g) * jnp.linalg.norm(tau)
  dot = jnp.vdot(g, tau, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1), 0)


@jax.jit
def _cosine_alignments(gradient: PyTree, pool: Sequence[PyTree]) -> jax.Array:
  """f32[K]: sum over leaves of cos(g_leaf, tau_k leaf)."""
  return jnp.stack([sum(jax.tree.leaves(jax.tree.map(_leaf_cosine, gradient, tau))) for tau in pool])


def fw_alignments(gradient: PyTree, pool: Sequence[PyTree], *, alignment: str = "inner") -> jax.Array:
  """f32[K]: the oracle's score of each task vector (lower is picked first).

  Args:
    gradient: g, shaped like the task vectors.
    pool: K task vectors tau_k.
    alignment: "inner" (<g, tau_k>) or "cosine" (the sum over leaves of
      cos(g_leaf, tau_k leaf), 0 for a zero leaf).
  """
  _check_choice("alignment", alignment, ALIGNMENTS)
  pool = tv._check_models(gradient, pool, "pool", "gradient", "task vector")
  fn = _inner_alignments if alignment == "inner" else _cosine_alignments
  return fn(gradient, pool)


def fw_select(gradient: PyTree, pool: Sequence[PyTree], *, alignment: str = "inner",
              exclude: Sequence[int] = ()) -> int:
  """The linear minimisation oracle: the index of the task vector least aligned with g.

  argmin_k of `fw_alignments` over k not in `exclude` (the first of equals),
  i.e. the vertex base + tau_k most aligned with the negative gradient.

  Args:
    gradient: g, shaped like the task vectors.
    pool: K task vectors.
    alignment: "inner" or "cosine" (`fw_alignments`).
    exclude: indices not to pick; at least one must remain.
  """
  scores = np.asarray(fw_alignments(gradient, pool, alignment=alignment), np.float64)
  excluded = set(_check_indices(exclude, len(pool)))
  if len(excluded) == len(pool):
    raise ValueError(f"exclude {sorted(excluded)} leaves none of the {len(pool)} task vectors to pick")
  scores[list(excluded)] = np.inf
  return int(np.argmin(scores))


@jax.jit
def _step(theta: PyTree, base: PyTree, direction: PyTree, gamma: jax.Array) -> PyTree:
  """theta + gamma (base + direction - theta), in float32, each leaf in theta's dtype."""
  def leaf(x, b, d):
    x32 = x.astype(jnp.float32)
    return (x32 + gamma * (b.astype(jnp.float32) + d.astype(jnp.float32) - x32)).astype(x.dtype)
  return jax.tree.map(leaf, theta, base, direction)


@jax.jit
def _directions(theta: PyTree, base: PyTree, picked: Sequence[PyTree]) -> PyTree:
  """A tree like theta of f32[J, *leaf.shape]: base + tau_j - theta for each picked task vector."""
  return jax.tree.map(lambda x, b, *ts: jnp.stack([b.astype(jnp.float32) + t.astype(jnp.float32)
                                                   - x.astype(jnp.float32) for t in ts]), theta, base, *picked)


@jax.jit
def _gap(gradient: PyTree, theta: PyTree, base: PyTree, direction: PyTree) -> jax.Array:
  """<g, theta - (base + direction)>."""
  return tree.vdot(gradient, jax.tree.map(
      lambda x, b, d: x.astype(jnp.float32) - b.astype(jnp.float32) - d.astype(jnp.float32),
      theta, base, direction))


def _task_losses(value_and_grad, theta: PyTree, data: Sequence[Sequence[Any]]):
  """Each task's mean loss over its batches, and each task's mean gradient."""
  losses, gradients = [], []
  for batches in data:
    total, gradient = 0.0, None
    for batch in batches:
      value, g = value_and_grad(theta, batch)
      total += float(value)
      gradient = g if gradient is None else jax.tree.map(jnp.add, gradient, g)
    losses.append(total / len(batches))
    gradients.append(jax.tree.map(lambda x, n=len(batches): x / n, gradient))
  return losses, gradients


@functools.lru_cache(maxsize=8)
def _compiled(loss_fn: LossFn):
  """loss_fn's jitted value_and_grad, slope along a step, and f (the soft weights' objective); kept, so
  calls with one loss_fn compile once."""
  @jax.jit
  def slope(theta, base, direction, gamma, batch):
    """d/dgamma loss_fn(theta + gamma (base + direction - theta), batch)."""
    point = _step(theta, base, direction, gamma)
    tangent = jax.tree.map(lambda x, b, d: (b.astype(jnp.float32) + d.astype(jnp.float32)
                                            - x.astype(jnp.float32)).astype(x.dtype), theta, base, direction)
    return jax.jvp(lambda v: loss_fn(v, batch), (point,), (tangent,))[1]

  def objective(theta, data):
    """f(theta) = sum over tasks of the mean loss over the task's batches (traced)."""
    return sum(sum(loss_fn(theta, b) for b in batches) / len(batches) for batches in data)

  return jax.jit(jax.value_and_grad(loss_fn)), slope, objective


def _line_search(slope_at: Callable[[float], float], iterations: int) -> float:
  """Bisection on the sign of phi'(gamma) in [0, 1]: where phi = f(theta + gamma (s - theta)) stops falling.

  0 if phi' >= 0 at 0, 1 if phi' <= 0 at 1, else the centre of the final
  bracket [lo, hi] with phi'(lo) < 0 < phi'(hi) (a local minimum; the minimum
  for convex phi), 2^-iterations wide. The sign of a derivative is exact to
  float rounding of phi', where comparing values of phi in float32 would
  place the minimum only to about the square root of float32's epsilon.
  """
  if slope_at(0.0) >= 0:
    return 0.0
  if slope_at(1.0) <= 0:
    return 1.0
  lo, hi = 0.0, 1.0
  for _ in range(iterations):
    mid = (lo + hi) / 2
    if slope_at(mid) < 0:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_int(name: str, value: Any, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  return int(value)


def _check_indices(indices: Sequence[int], size: int) -> list[int]:
  out = []
  for i in indices:
    if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < size:
      raise ValueError(f"exclude holds {i!r}, not an index of the {size} task vectors")
    out.append(int(i))
  return out


def _check_data(data: Sequence[Sequence[Any]]) -> list[list[Any]]:
  data = [list(batches) for batches in data]
  if not data:
    raise ValueError("data is empty: give one sequence of batches per task")
  for j, batches in enumerate(data):
    if not batches:
      raise ValueError(f"data[{j}] has no batches: each task needs at least one")
  return data


def fw_merge(
    loss_fn: LossFn,
    base: PyTree,
    pool: Sequence[PyTree],
    data: Sequence[Sequence[Any]],
    *,
    steps: int,
    step_size: str = "harmonic",
    step_scale: float = 1.0,
    variant: str = "hard",
    alignment: str = "inner",
    init: PyTree | None = None,
    line_search_iterations: int = 20,
    soft: Mapping[str, Any] | None = None,
) -> tuple[PyTree, FWTrace]:
  """FW-merging (Chen et al. 2025): see the module docstring for the steps.

  Args:
    loss_fn: (variables, batch) -> f32[], a task's loss on one batch (e.g.
      cross-entropy on labelled training data); differentiable in variables.
    base: the pre-trained model.
    pool: K >= 1 task vectors tau_k (fine-tuned model - base), shaped like base;
      the vertices are base + tau_k.
    data: one non-empty sequence of batches per task; f is the sum over tasks
      of each task's mean loss over its batches. Each step reads all of it once
      (and line search reads it `line_search_iterations` + 2 times more, each
      a forward-mode derivative).
    steps: T >= 1, the FW steps.
    step_size: "harmonic" (gamma_t = step_scale * 2 / (t + 2)) or
      "line_search" (gamma in [0, 1] where f stops falling along the
      direction, to 2^-line_search_iterations); "hard" only.
    step_scale: the harmonic rule's factor, in (0, 1] (FusionBench's
      `step_size`); ignored by line search and "soft".
    variant: "hard" (one vertex per step, on the summed loss's gradient) or
      "soft" (one vertex per task on its own loss's gradient, combined with
      weights learned on f).
    alignment: the oracle's score, "inner" or "cosine" (`fw_alignments`).
    init: theta_0, shaped like base (default: base).
    line_search_iterations: bisection halvings per step, >= 1.
    soft: "soft" only: the weights' optimisation, `mj.merge.adamerging`'s
      keywords steps, learning_rate, init, granularity, blocks, clip and
      optimizer, each defaulting to adamerging's (1000 Adam steps at 1e-3
      from 0.3, task-wise), run anew from `init` at every FW step.

  Returns:
    `(merged, FWTrace)`: theta_T (each leaf in the dtype of `init`'s, or
    base's, leaf) and the trace.
  """
  _check_choice("variant", variant, VARIANTS)
  _check_choice("alignment", alignment, ALIGNMENTS)
  _check_choice("step_size", step_size, STEP_SIZES)
  steps = _check_int("steps", steps, 1)
  line_search_iterations = _check_int("line_search_iterations", line_search_iterations, 1)
  if not (math.isfinite(step_scale) and 0 < step_scale <= 1):
    raise ValueError(f"step_scale must be in (0, 1], got {step_scale}")
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be a callable (variables, batch) -> scalar, got {loss_fn!r}")
  if soft is not None and variant != "soft":
    raise ValueError(f"soft holds the soft variant's weight optimisation; got it with variant={variant!r}")
  pool = tv._check_models(base, pool, "pool", "base", "task vector")
  data = _check_data(data)
  fit = None
  if variant == "soft":
    unknown = sorted(set(soft or {}) - SOFT_OPTIONS)
    if unknown:
      raise ValueError(f"soft: unknown keys {unknown}; allowed {sorted(SOFT_OPTIONS)}")
    fit = _check_fit(base, min(len(data), len(pool)), **(soft or {}))
    task_wise = (soft or {}).get("granularity", "task") == "task"
  tree.check_finite(base, "base")
  for k, tau in enumerate(pool):
    tree.check_finite(tau, f"pool[{k}]")
  theta = base
  if init is not None:
    try:
      tree.check_same_shapes(base, init)
    except ValueError as e:
      raise ValueError(f"init does not match base: {e}") from None
    tree.check_finite(init, "init")
    theta = init

  value_and_grad, slope, objective = _compiled(loss_fn)
  chosen, gammas, losses, gaps, weights = [], [], [], [], []
  for t in range(steps):
    task_losses, task_grads = _task_losses(value_and_grad, theta, data)
    losses.append(sum(task_losses))
    gradient = jax.tree.map(lambda *gs: sum(gs), *task_grads)
    vertex = fw_select(gradient, pool, alignment=alignment)
    gaps.append(float(_gap(gradient, theta, base, pool[vertex])))
    if variant == "hard":
      picks = (vertex,)
      if step_size == "harmonic":
        gamma = step_scale * 2.0 / (t + 2)
      else:
        gamma = _line_search(
            lambda s, th=theta, d=pool[vertex]: sum(float(slope(th, base, d, s, b)) / len(bs)
                                                    for bs in data for b in bs),
            line_search_iterations)
      theta = _step(theta, base, pool[vertex], jnp.float32(gamma))
      lam = np.array([gamma])
    else:
      picked: list[int] = []
      for g in task_grads[:len(pool)]:
        picked.append(fw_select(g, pool, alignment=alignment, exclude=picked))
      picks = tuple(picked)
      directions = _directions(theta, base, [pool[k] for k in picks])
      lam = _fit_to_objective(
          objective, theta, directions, data, fit.coefficients, jnp.float32(fit.learning_rate), fit.steps,
          fit.clip, groups=fit.groups, optimizer=fit.optimizer)
      theta = _merge_jit(theta, directions, lam, fit.groups, None)
      lam = np.asarray(lam, np.float64)
      lam = lam[:, 0] if task_wise else lam
      gamma = float(lam.sum(0).mean())
    chosen.append(picks)
    gammas.append(gamma)
    weights.append(lam)
  losses.append(sum(_task_losses(value_and_grad, theta, data)[0]))  # value_and_grad: compiled already
  return theta, FWTrace(chosen, np.array(gammas), np.array(losses), np.array(gaps), weights)
