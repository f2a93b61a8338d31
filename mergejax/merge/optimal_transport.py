"""OT fusion: soft alignment by optimal transport, to the target model's width.

    fused, plans = ot_fusion(apply_a, va, vb, x)                 # exact OT, weight cost
    fused, plans = ot_fusion(apply_a, va, vb, x, cost="activation", epsilon=0.05,
                             apply_fn_b=apply_b)                 # B wider than A: Sinkhorn

Singh & Jaggi's OT fusion (NeurIPS 2020) and its transformer form (Imfeld et
al., ICLR 2024) align model B's units to model A's by a transport plan per
layer instead of a permutation, then average: `fused = (1 - t) A + t B'`. The
plans here are one per permutation group of mergejax's traced spec (DESIGN.md,
OT fusion): every axis of every leaf that a group names is carried by that
group's plan `T: f32[n_b, n_a]` (uniform marginals 1/n_b, 1/n_a), so B may be
wider than A and the fused model has A's widths. Units of A are barycentres of
B's units on output axes (rows of the layer making them: `diag(1/b) T^T`) and
B's inputs are read from A's units on input axes (`W diag(1/a) T`): for equal
widths both are the permutation an exact plan is; a B made by duplicating A's
units (halving their outgoing weights) is carried back to A exactly.

Costs (`cost=`): "weight", the squared distance of the units' incoming weights
(each group's refs on output axes; B's axes of groups already transported are
carried onto A's units, axes of groups not yet transported are averaged out on
output axes and summed out on input axes, which any plan leaves unchanged),
groups in the order the function first reads them; or "activation", the
squared distance of the units' activations on one batch `x` (the features
activation matching reads: kernels' inputs along the group). Exact OT
(`epsilon=0`) is `mergejax.lap` for equal widths and SciPy's HiGHS linear
program otherwise; `epsilon > 0` is ott-jax's Sinkhorn (relative to the mean
cost). ott-jax is imported only for Sinkhorn: `pip install mergejax[ot]`.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.sparse

from mergejax import align
from mergejax.lap import lap
from mergejax import spec as spec_lib
from mergejax import trace
from mergejax import tree
from mergejax.merge import compact

PyTree = Any
Path = tuple[str, ...]
COSTS = ("weight", "activation")


def transport_plan(cost: jax.Array, *, epsilon: float = 0.0, max_iterations: int = 2000) -> jax.Array:
  """The optimal transport plan between uniform marginals for `cost`.

  Args:
    cost: f32[n, m], the cost of moving unit i (rows) onto unit j (columns).
    epsilon: 0 for exact OT; > 0 for Sinkhorn's entropic plan at regularisation
      `epsilon * mean(|cost|)` (ott-jax, the `ot` extra).
    max_iterations: Sinkhorn's iteration limit (a warning if it is reached).

  Returns:
    f32[n, m], rows summing to 1/n and columns to 1/m. Exact with n == m: the
    permutation `mergejax.lap(cost, maximize=False)` scaled by 1/n; exact with
    n != m: a vertex of the transportation polytope from SciPy's HiGHS.

  Raises:
    ValueError: cost not 2-D, empty, or not finite; epsilon negative or not finite.
  """
  cost = np.asarray(cost, np.float64)
  if cost.ndim != 2 or 0 in cost.shape:
    raise ValueError(f"transport_plan: cost must be a non-empty f32[n, m], got shape {cost.shape}")
  if not np.all(np.isfinite(cost)):
    raise ValueError("transport_plan: cost has NaN or Inf entries")
  if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < np.inf:
    raise ValueError(f"transport_plan: epsilon must be a finite number >= 0, got {epsilon!r}")
  if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
    raise ValueError(f"transport_plan: max_iterations must be a positive int, got {max_iterations!r}")
  n, m = cost.shape
  if epsilon == 0 and n == m:
    col = np.asarray(lap(cost.astype(np.float32), maximize=False))
    plan = np.zeros((n, n), np.float32)
    plan[np.arange(n), col] = 1.0 / n
    return jnp.asarray(plan)
  if epsilon == 0:
    return jnp.asarray(_exact_plan(cost), jnp.float32)
  return _sinkhorn_plan(cost, epsilon, max_iterations)


def _exact_plan(cost: np.ndarray) -> np.ndarray:
  """f64[n, m]: the transportation LP `min <C, P>`, rows 1/n, columns 1/m, by HiGHS."""
  n, m = cost.shape
  rows = scipy.sparse.kron(scipy.sparse.eye(n), np.ones((1, m)))
  cols = scipy.sparse.kron(np.ones((1, n)), scipy.sparse.eye(m))
  marginals = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
  # The cost is rescaled to unit mean so HiGHS's tolerances mean the same at any scale.
  scale = np.abs(cost).mean() or 1.0
  result = scipy.optimize.linprog((cost / scale).ravel(), A_eq=scipy.sparse.vstack([rows, cols]).tocsr(),
                                  b_eq=marginals, bounds=(0, None), method="highs")
  if result.status != 0:
    raise RuntimeError(f"transport_plan: HiGHS failed on a {n}x{m} problem: {result.message}")
  return np.maximum(result.x.reshape(n, m), 0.0)


def _sinkhorn_plan(cost: np.ndarray, epsilon: float, max_iterations: int) -> jax.Array:
  scale = np.abs(cost).mean() or 1.0
  plan, converged = _sinkhorn(max_iterations)(jnp.asarray(cost / scale, jnp.float32), jnp.float32(epsilon))
  if not bool(converged):
    warnings.warn(f"transport_plan: Sinkhorn did not converge in {max_iterations} iterations at epsilon"
                  f" {epsilon}; raise max_iterations or epsilon", RuntimeWarning, stacklevel=3)
  return plan


@functools.lru_cache(maxsize=None)
def _sinkhorn(max_iterations: int) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """ott-jax's Sinkhorn, jitted with epsilon traced (one compilation per shape): (plan, converged)."""
  try:
    with warnings.catch_warnings():  # ott imports jaxopt, which warns that it is unmaintained.
      warnings.simplefilter("ignore", DeprecationWarning)
      from ott.geometry import geometry  # pylint: disable=g-import-not-at-top
      from ott.problems.linear import linear_problem  # pylint: disable=g-import-not-at-top
      from ott.solvers.linear import sinkhorn  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("transport_plan: epsilon > 0 uses ott-jax's Sinkhorn; install the `ot` extra"
                      " (pip install 'mergejax[ot]')") from e
  solver = sinkhorn.Sinkhorn(max_iterations=max_iterations)

  @jax.jit
  def run(cost, epsilon):
    out = solver(linear_problem.LinearProblem(geometry.Geometry(cost_matrix=cost, epsilon=epsilon)))
    return out.matrix, out.converged

  return run


def ot_fusion(
    apply_fn: Callable[..., Any],
    va: PyTree,
    vb: PyTree,
    x: Any,
    *,
    t: float = 0.5,
    **options: Any,
) -> tuple[PyTree, dict[str, jax.Array]]:
  """Fuses B into A's widths: `(1 - t) A + t B'`, B' = `ot_align(apply_fn, va, vb, x, **options)`.

  Args:
    apply_fn, va, vb, x: as `ot_align`.
    t: B's weight, in [0, 1].
    **options: `ot_align`'s keywords (cost, epsilon, apply_fn_b, spec, spec_b).

  Returns:
    (fused variables with A's shapes and dtypes, plans {group: f32[n_b, n_a]}).
  """
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
    raise ValueError(f"ot_fusion: t must be a number in [0, 1], got {t!r}")
  aligned, plans = ot_align(apply_fn, va, vb, x, **options)
  fused = jax.tree.map(lambda a, b: jnp.asarray((1 - t) * np.asarray(a, np.float32) + t * np.asarray(b, np.float32),
                                                jnp.result_type(a)), va, aligned)
  return fused, plans


def ot_align(
    apply_fn: Callable[..., Any],
    va: PyTree,
    vb: PyTree,
    x: Any,
    *,
    cost: str = "weight",
    epsilon: float = 0.0,
    apply_fn_b: Callable[..., Any] | None = None,
    spec: spec_lib.PermutationSpec | None = None,
    spec_b: spec_lib.PermutationSpec | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
  """Model B carried onto model A's units by one transport plan per group.

  Args:
    apply_fn: `apply_fn(va, x)`, model A's function (the target widths).
    va: model A's variables.
    vb: model B's variables: A's tree, each grouped axis as wide as A's or wider
      or narrower; every other axis as A's.
    x: one batch of inputs: the example the specs and kernels are traced on,
      and the data of the activation cost.
    cost: "weight" or "activation" (module docstring).
    epsilon: 0 for exact OT; > 0 for Sinkhorn (`transport_plan`).
    apply_fn_b: model B's function where its widths differ (default `apply_fn`).
    spec, spec_b: A's and B's specs (default: traced); one group names, each
      group the same (path, axis) refs.

  Returns:
    (B's variables with A's shapes and dtypes, plans {group: f32[n_b, n_a]}).

  Raises:
    ValueError: an unknown cost, bad epsilon, trees that differ (naming the
      leaf), specs whose groups differ (naming the group), non-finite weights.
    NotImplementedError: batched groups (scanned layers) or refs with parts
      (fused q|k|v), naming them.
  """
  if cost not in COSTS:
    raise ValueError(f"ot_align: cost must be one of {COSTS}, got {cost!r}")
  if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < np.inf:
    raise ValueError(f"ot_align: epsilon must be a finite number >= 0, got {epsilon!r}")
  apply_fn_b = apply_fn if apply_fn_b is None else apply_fn_b
  tree.check_same_structure(va, vb)
  tree.check_finite(va, "va")
  tree.check_finite(vb, "vb")
  spec_a = _traced_spec(apply_fn, va, x) if spec is None else spec
  spec_b = _traced_spec(apply_fn_b, vb, x) if spec_b is None else spec_b
  _check_specs(spec_a, spec_b)
  spec_lib.check_spec(spec_a, va)
  spec_lib.check_spec(spec_b, vb)
  leaves_a, leaves_b = tree.leaves_by_path(va), tree.leaves_by_path(vb)
  named = {r.path for refs in spec_a.groups.values() for r in refs}
  for path, leaf in leaves_a.items():
    if path not in named and np.shape(leaf) != np.shape(leaves_b[path]):
      raise ValueError(f"ot_align: {tree.path_str(path)} has shape {np.shape(leaf)} in va and"
                       f" {np.shape(leaves_b[path])} in vb but no group names it")
  inputs = compact.kernel_inputs(apply_fn, va, x)
  views_a, views_b = _views(spec_a, leaves_a), _views(spec_b, leaves_b)
  for path, view in views_a.items():
    grouped = set(view.where.values())
    if [d for i, d in enumerate(view.split) if i not in grouped] != [
        d for i, d in enumerate(views_b[path].split) if i not in grouped]:
      raise ValueError(f"ot_align: {tree.path_str(path)} has shape {np.shape(leaves_a[path])} in va and"
                       f" {np.shape(leaves_b[path])} in vb, which differ outside its groups' axes")
  plans: dict[str, jax.Array] = {}
  if cost == "activation":
    costs = _activation_costs(apply_fn, apply_fn_b, spec_a, spec_b, va, vb, x)
    for g in spec_a.groups:
      plans[g] = _plan(g, costs.get(g), spec_a, spec_b, epsilon)
  else:
    for g in _forward_order(spec_a, inputs, trace.read_order(apply_fn, va, x)):
      c = _weight_cost(g, spec_a, views_a, views_b, leaves_a, leaves_b, inputs, plans)
      plans[g] = _plan(g, c, spec_a, spec_b, epsilon)
    plans = {g: plans[g] for g in spec_a.groups}
  maps = {g: _maps(p) for g, p in plans.items()}
  aligned = {}
  for path, leaf_a in leaves_a.items():
    leaf_b = np.asarray(leaves_b[path], np.float32)
    if path in views_b:
      ops = {pos: maps[g][kind] for g, pos, kind in _components(views_b[path], inputs.get(path, frozenset()))}
      leaf_b = _apply(leaf_b, views_b[path].split, ops).reshape(np.shape(leaf_a))
    aligned[path] = jnp.asarray(leaf_b, jnp.result_type(leaf_a))
  return tree.replace_leaves(va, aligned), plans


def _traced_spec(apply_fn, variables, x) -> spec_lib.PermutationSpec:
  """The traced spec, without the warning for fixed axes (they are simply not transported)."""
  return trace.permutation_spec(apply_fn, variables, x, warn=False)


def _check_specs(spec_a: spec_lib.PermutationSpec, spec_b: spec_lib.PermutationSpec) -> None:
  batched = sorted(set(spec_a.batch_sizes) | set(spec_b.batch_sizes))
  if batched:
    raise NotImplementedError(f"ot_align: batched groups {batched} (scanned layers) are not supported;"
                              " unroll the model")
  if set(spec_a.groups) != set(spec_b.groups):
    diff = sorted(set(spec_a.groups) ^ set(spec_b.groups))
    raise ValueError(f"ot_align: A's and B's specs differ in groups {diff}")
  for g in spec_a.groups:
    where_a = sorted((r.path, r.axis) for r in spec_a.groups[g])
    where_b = sorted((r.path, r.axis) for r in spec_b.groups[g])
    if where_a != where_b:
      raise ValueError(f"ot_align: group {g!r} names different axes in A's and B's specs")
    parted = [tree.path_str(r.path) for r in spec_a.groups[g] + spec_b.groups[g] if r.part is not None]
    if parted:
      raise NotImplementedError(f"ot_align: group {g!r} has refs with parts (fused projections) on"
                                f" {sorted(set(parted))}; not supported")


class _View:
  """A leaf's axes split into their factors' components: `split` shape, and
  `where[(g, axis)]` the component position of group g's ref on that axis."""

  def __init__(self, path: Path, shape: Sequence[int], refs: Sequence[tuple[str, spec_lib.AxisRef]]):
    by_axis: dict[int, list[tuple[str, spec_lib.AxisRef]]] = {}
    for g, r in refs:
      by_axis.setdefault(r.axis, []).append((g, r))
    self.split: list[int] = []
    self.where: dict[tuple[str, int], int] = {}
    for axis, size in enumerate(shape):
      claims = by_axis.get(axis, [])
      views = {tuple(r.factor[0]) if r.factor is not None else (size,) for _, r in claims}
      if len(views) > 1:
        raise NotImplementedError(f"ot_align: {tree.path_str(path)} axis {axis} is viewed as {sorted(views)};"
                                  " several views of one axis are not supported")
      view = views.pop() if views else (size,)
      for g, r in claims:
        self.where[(g, axis)] = len(self.split) + (r.factor[1] if r.factor is not None else 0)
      self.split.extend(view)


def _views(spec: spec_lib.PermutationSpec, leaves: Mapping[Path, Any]) -> dict[Path, _View]:
  refs: dict[Path, list[tuple[str, spec_lib.AxisRef]]] = {}
  for g, rs in spec.groups.items():
    for r in rs:
      refs.setdefault(r.path, []).append((g, r))
  return {path: _View(path, np.shape(leaves[path]), rs) for path, rs in refs.items()}


def _components(view: _View, contracted: frozenset[int]) -> list[tuple[str, int, str]]:
  """(group, split position, "in" | "out") of each grouped component of a leaf whose
  kernel contracts axes `contracted` with its input (input axes: "in")."""
  return [(g, pos, "in" if axis in contracted else "out") for (g, axis), pos in view.where.items()]


def _apply(x: np.ndarray, split: Sequence[int], ops: Mapping[int, Any]) -> np.ndarray:
  """x viewed as `split`, each position p in `ops` contracted with ops[p]: f32[n_b, n_a]
  (a map), or reduced by "sum" / "mean"; positions are processed last first."""
  x = x.reshape(tuple(split))
  for pos in sorted(ops, reverse=True):
    op = ops[pos]
    if isinstance(op, str):
      x = x.sum(axis=pos) if op == "sum" else x.mean(axis=pos)
    else:
      x = np.moveaxis(np.tensordot(x, op, axes=([pos], [0])), -1, pos)
  return x


def _maps(plan: jax.Array) -> dict[str, np.ndarray]:
  """A plan's carriers, f32[n_b, n_a]: "out" (barycentres: columns normalised), "in" (rows normalised)."""
  plan = np.asarray(plan, np.float32)
  cols, rows = plan.sum(0, keepdims=True), plan.sum(1, keepdims=True)
  return {"out": plan / np.where(cols > 0, cols, 1), "in": plan / np.where(rows > 0, rows, 1)}


def _plan(g: str, c, spec_a, spec_b, epsilon: float) -> jax.Array:
  n_a, n_b = spec_a.sizes[g], spec_b.sizes[g]
  if c is None:  # A group no leaf names (a zoo group of one unit).
    return jnp.ones((n_b, n_a), jnp.float32) / (n_a * n_b)
  return transport_plan(c, epsilon=epsilon)


def _forward_order(spec: spec_lib.PermutationSpec, inputs: Mapping[Path, frozenset[int]],
                   order: Sequence[Path]) -> list[str]:
  """Groups by the first read of a leaf holding their units' own weights (an output axis)."""
  rank = {p: i for i, p in enumerate(order)}
  far = len(order)

  def first(g):
    refs = spec.groups[g]
    own = [r for r in refs if r.axis not in inputs.get(r.path, ())] or refs
    return min((rank.get(r.path, far) for r in own), default=far)

  return sorted(spec.groups, key=first)


def _weight_cost(g, spec_a, views_a, views_b, leaves_a, leaves_b, inputs, plans) -> np.ndarray | None:
  """f32[n_b, n_a]: summed squared distances of the units' incoming weights (module docstring)."""
  refs = spec_a.groups[g]
  if not refs:
    return None
  own = [r for r in refs if r.axis not in inputs.get(r.path, ())] or refs
  total = None
  for r in own:
    rows = []
    for views, leaves, is_b in ((views_a, leaves_a, False), (views_b, leaves_b, True)):
      view = views[r.path]
      ops = {}
      for h, pos, kind in _components(view, inputs.get(r.path, frozenset())):
        if pos == view.where[(g, r.axis)]:
          continue
        if h in plans:
          if is_b:
            ops[pos] = _maps(plans[h])[kind]
        else:
          ops[pos] = "sum" if kind == "in" else "mean"
      keep = view.where[(g, r.axis)]
      x = _apply(np.asarray(leaves[r.path], np.float32), view.split, ops)
      keep -= sum(1 for p in ops if p < keep and isinstance(ops[p], str))
      rows.append(np.moveaxis(x, keep, 0).reshape(x.shape[keep], -1))
    d = _squared_distances(rows[1], rows[0])
    total = d if total is None else total + d
  return total


def _squared_distances(rows_b: np.ndarray, rows_a: np.ndarray) -> np.ndarray:
  """f64[n_b, n_a]: ||b_i - a_j||^2 (float64: exact zeros stay zeros to rounding)."""
  rows_b, rows_a = np.asarray(rows_b, np.float64), np.asarray(rows_a, np.float64)
  return np.maximum((rows_b ** 2).sum(1)[:, None] + (rows_a ** 2).sum(1)[None, :] - 2 * rows_b @ rows_a.T, 0.0)


def _activation_costs(apply_fn, apply_fn_b, spec_a, spec_b, va, vb, x) -> dict[str, np.ndarray]:
  """{group: f32[n_b, n_a]}: mean squared distance of the units' activations on x,
  averaged over the group's features (activation matching's features)."""
  plans = []
  for fn, spec, v in ((apply_fn, spec_a, va), (apply_fn_b, spec_b, vb)):
    plans.append(align.feature_plan(spec, align.traced_kernel_uses(fn, v, x)))
  plan_a, plan_b = plans
  if [(f.group, f.path, f.use, f.axis) for f in plan_a] != [(f.group, f.path, f.use, f.axis) for f in plan_b]:
    raise ValueError("ot_align: A's and B's kernels read their groups differently")
  missing = sorted(g for g in spec_a.groups if spec_a.groups[g] and g not in {f.group for f in plan_a})
  if missing:
    raise ValueError(f"ot_align: no kernel reads or writes groups {missing}; use cost='weight'")
  costs: dict[str, np.ndarray] = {}
  count = {g: sum(f.group == g for f in plan_a) for g in spec_a.groups}
  for f, rows_a, rows_b in zip(plan_a, _feature_fn(apply_fn, tuple(plan_a))(va, x),
                                _feature_fn(apply_fn_b, tuple(plan_b))(vb, x)):
    rows_a = np.asarray(rows_a).reshape(-1, rows_a.shape[-1]).T
    rows_b = np.asarray(rows_b).reshape(-1, rows_b.shape[-1]).T
    d = _squared_distances(rows_b, rows_a) / (rows_a.shape[1] * count[f.group])
    costs[f.group] = costs.get(f.group, 0) + d
  return costs


def _feature_fn(apply_fn: Callable[..., Any], plan: tuple) -> Callable[[PyTree, Any], list[jax.Array]]:
  try:
    hash(apply_fn)
  except TypeError:  # An unhashable callable: compiled for this call only.
    return _features.__wrapped__(apply_fn, plan)
  return _features(apply_fn, plan)


@functools.lru_cache(maxsize=16)
def _features(apply_fn: Callable[..., Any], plan: tuple) -> Callable[[PyTree, Any], list[jax.Array]]:
  """Jitted: the features of `plan` (activation matching's) in `apply_fn(variables, x)`;
  cached so repeated fusions of one model compile once."""

  def run(variables, x):
    uses = trace.kernel_uses(apply_fn)(variables, x)[1]
    return [align.feature_rows(uses[f.path][f.use].output if f.is_output
                               else uses[f.path][f.use].input, f) for f in plan]

  return jax.jit(run)
