"""Continual merging: models that share a base arrive one at a time.

An accumulator in the style of optax's `init`/`update`: the state holds what
the merge needs, each fine-tuned model is folded in once and can then be
dropped, and `finalize` gives the merged model after any number of them.

    merger = mj.merge.opcm(alpha=0.5)
    state = merger.init(base)
    for model in models:            # loaded one at a time, none kept
      state = merger.update(state, model)
    merged = merger.finalize(state)
    merged = mj.merge.merge_in_order(merger, base, models, order=[2, 0, 1])

OPCM, orthogonal-projection continual merging (Tang et al., "Merging Models
on the Fly Without Retraining: A Sequential Approach to Scalable Continual
Model Merging", arXiv 2501.09522: the projection of each new task vector
and the adaptive time-varying scaling of its method; FusionBench's `opcm`,
fusion_bench/method/opcm/opcm.py, by the same authors, is the reference for
the details below, and the numbers (1)-(4) are this docstring's). With
tau_i = models[i] - base in arrival order:

  (1) Projection. At each matrix leaf (below), let M = S_{t-1} be the sum of
      the projected task vectors merged so far (any positive multiple, such
      as the merged task vector, gives the same result), with the thin SVD
      M = U diag(sigma) V^T, sigma descending, and rho its numerical rank
      (sigma_i > sigma_1 max(m, n) eps, eps the machine epsilon of S's
      dtype). The block
      rank r_alpha is the number of i < rho with
      sigma_1 + ... + sigma_i <= alpha (sigma_1 + ... + sigma_k): the leading
      singular values holding at most a fraction alpha of their sum. In the
      basis C = U^T tau_t V, the new task vector loses the top-left block
      C[:r, :r] and the diagonal C[i, i] of every i < rho:

        P_{t-1}(tau_t) = tau_t - U (C * Z) V^T,
        Z_ij = (i < r and j < r) or (i = j < rho).

      So P_{t-1}(tau_t) is orthogonal (Frobenius) to M and to its leading
      singular directions' whole block; components of tau_t outside M's row
      and column spaces are kept. Every other leaf is added unprojected
      (P = identity), as FusionBench does for biases and norms. P_0 is the
      identity (M = 0 has rank 0): the first model is taken as it is.
  (2) Sum: S_t = S_{t-1} + P_{t-1}(tau_t), S_0 = 0.
  (3) Time-varying scale: lambda_t = ||S_t|| / nu_t with
      nu_t = (||tau_1|| + ... + ||tau_t||) / t, the norms over the whole
      model (all leaves). lambda_1 = 1, and lambda_t ~ sqrt(t) for orthogonal
      task vectors of equal norm.
  (4) Merged model: theta_t = base + S_t / lambda_t, so the merged task
      vector's norm is the mean norm of the task vectors merged so far. This
      is FusionBench's recursion theta_t = base + (lambda_{t-1}
      (theta_{t-1} - base) + P_{t-1}(tau_t)) / lambda_t written without it.

Conventions. A matrix leaf is, by default, every 2-D leaf with entries (a
Flax Dense kernel `(in, out)`: the projection treats a matrix and its
transpose alike, so PyTorch's `(out, in)` gives the same merge); `row_axes`
views other leaves as matrices, `x.reshape(prod(shape[:k]), -1)` with k
leading row axes (e.g. 1 for a Flax attention query kernel `(embed, heads,
head_dim)`, 2 for its output kernel `(heads, head_dim, embed)`, 3 for a
convolution kernel `(kh, kw, c_in, c_out)`). M's null directions (singular
values at or below the tolerance) are never removed: FusionBench's full SVD
also zeroes the diagonal in the arbitrary basis LAPACK gives M's null space,
so the two agree whenever M has full rank min(m, n) (after the first model,
for dense fine-tuning). The cumulative share sums singular
values, not their squares, as FusionBench does; default alpha = 0.5, its
configuration's. Task vectors and S are float32 (or wider where the base
is); the merged leaves keep the base's dtypes. The order of the models
matters through the projections only: with no matrix leaf, or with task
vectors whose matrices occupy disjoint rows (or columns), every order gives
task arithmetic at scale nu_t / ||tau_1 + ... + tau_t||.

Memory: the state holds the base (as given) and S (float32, one model's
size), plus three scalars; an update holds one model more and the thin SVD
factors of the matrix leaves ((m + n + 1) min(m, n) floats each). The update is per leaf but
for ||tau_t||, a sum of squares over leaves, and `finalize` needs ||S_t||
first; an out-of-core merge can stream S leaf by leaf in two passes.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import tree
from mergejax.merge import task_vectors as tv

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST


class OPCMState(NamedTuple):
  """OPCM's accumulator, a pytree.

  Attributes:
    base: the pre-trained model, as given to `init`.
    projected_sum: S_t, the sum of the projected task vectors, a tree like
      the base in float32 (or the base's wider dtype).
    norm_sum: f32[]: ||tau_1|| + ... + ||tau_t||.
    count: i32[]: t, the number of models merged.
  """

  base: PyTree
  projected_sum: PyTree
  norm_sum: jax.Array
  count: jax.Array


class ContinualMerge(NamedTuple):
  """A continual merge: `init(base)`, `update(state, model)`, `finalize(state)`."""

  init: Callable[[PyTree], Any]
  update: Callable[[Any, PyTree], Any]
  finalize: Callable[[Any], PyTree]


@jax.jit
def opcm_projection(previous: jax.Array, tau: jax.Array, alpha: float) -> jax.Array:
  """P(tau), OPCM's projection (1) of a new task vector at one matrix.

  Args:
    previous: f32[m, n], M, the sum of the projected task vectors merged so
      far at this matrix (or any positive multiple of it).
    tau: f32[m, n], the new task vector's matrix.
    alpha: the share of M's singular-value sum whose leading block is
      removed, in [0, 1).

  Returns:
    f32[m, n]: tau without the block C[:r, :r] and the diagonal C[i, i],
    i < rank, of its coefficients C = U^T tau V in M's singular bases.
  """
  u, sigma, vt = jnp.linalg.svd(previous, full_matrices=False)
  tolerance = sigma[0] * max(previous.shape) * jnp.finfo(sigma.dtype).eps
  singular = sigma > tolerance
  leading = singular & (jnp.cumsum(sigma) <= alpha * jnp.sum(sigma))
  diagonal = jnp.eye(sigma.shape[0], dtype=bool) & singular[:, None]
  removed = (leading[:, None] & leading[None, :]) | diagonal
  coefficients = jnp.matmul(jnp.matmul(u.T, tau, precision=HIGHEST), vt.T, precision=HIGHEST)
  dropped = jnp.where(removed, coefficients, 0)
  return tau - jnp.matmul(jnp.matmul(u, dropped, precision=HIGHEST), vt, precision=HIGHEST)


def _project_leaf(s: jax.Array, tau: jax.Array, alpha: jax.Array, rows: int | None) -> jax.Array:
  """P(tau) at one leaf viewed with `rows` leading row axes; tau where None."""
  if rows is None:
    return tau
  matrix = lambda x: x.reshape(int(np.prod(x.shape[:rows])), -1)
  return opcm_projection(matrix(s), matrix(tau), alpha).reshape(tau.shape)


@functools.partial(jax.jit, static_argnums=4)
def _opcm_step(base, projected_sum, model, alpha, rows):
  """(S_t, ||tau_t||) from S_{t-1} and one model; rows: per-leaf row axes."""
  leaves, treedef = jax.tree.flatten(base)
  sums = treedef.flatten_up_to(projected_sum)
  xs = treedef.flatten_up_to(model)
  taus = [tv._delta(x, b) for x, b in zip(xs, leaves)]
  new_sums = [s + _project_leaf(s, t, alpha, k) for s, t, k in zip(sums, taus, rows)]
  squares = sum((jnp.sum(jnp.square(t.astype(jnp.float32))) for t in taus), jnp.zeros((), jnp.float32))
  return treedef.unflatten(new_sums), jnp.sqrt(squares)


@jax.jit
def opcm_scaling(state: OPCMState) -> jax.Array:
  """lambda_t = ||S_t|| / nu_t, OPCM's time-varying scale (3); 1 when nu_t = 0.

  nu_t is the mean norm of the t task vectors merged; the merged model is
  base + S_t / lambda_t.
  """
  mean_norm = state.norm_sum / jnp.maximum(state.count, 1)
  return jnp.where(mean_norm > 0, tree.global_norm(state.projected_sum) / mean_norm, 1.0)


@jax.jit
def _rescaled(base: PyTree, projected_sum: PyTree, scaling: jax.Array) -> PyTree:
  """base + S / lambda in the base's dtypes (base where lambda = 0, i.e. S = 0)."""
  factor = jnp.where(scaling > 0, 1 / jnp.where(scaling > 0, scaling, 1), 0)
  return jax.tree.map(lambda b, s: tv._rebase(b, factor * s), base, projected_sum)


def _row_axes(base: PyTree, row_axes: Mapping[str, int]) -> tuple[int | None, ...]:
  """Each leaf's row axes as a matrix (None: not projected), in flattening order."""
  leaves = tree.leaves_with_paths(base)
  unknown = sorted(set(row_axes) - {p for p, _ in leaves})
  if unknown:
    raise ValueError(f"row_axes: {unknown[0]} is not a leaf of the base")
  out = []
  for path, x in leaves:
    shape = np.shape(x)
    if path in row_axes:
      if not 1 <= row_axes[path] < len(shape):
        raise ValueError(f"row_axes: {path} has shape {shape}; its row axes must be in [1, {len(shape)})")
      out.append(row_axes[path])
    else:
      out.append(1 if len(shape) == 2 and np.size(x) > 0 else None)
  return tuple(out)


def _check_alpha(alpha: float) -> float:
  if not 0 <= alpha < 1:
    raise ValueError(f"alpha must be in [0, 1), got {alpha}")
  return float(alpha)


def opcm(alpha: float = 0.5, *, row_axes: Mapping[str, int] | None = None) -> ContinualMerge:
  """OPCM, orthogonal-projection continual merging (see the module docstring).

  `init(base)` checks `row_axes` against the base and returns an `OPCMState`
  with S_0 = 0; `update(state, model)` checks the model against the base and
  folds it in with (1)-(2), as one jit-compiled function per tree shape (it
  also runs under `jax.jit`); `finalize(state)` returns (4),
  base + S_t / lambda_t, in the base's dtypes.

  Args:
    alpha: the fraction of M's singular-value sum whose leading block (1)
      removes from each new task vector, in [0, 1); 0 removes only the
      diagonal.
    row_axes: leaf path (`a/b/c`) -> the number of leading axes that index
      the rows of its matrix view; leaves not named are matrices when 2-D
      (one row axis) and unprojected otherwise.

  Returns:
    A `ContinualMerge`.

  Raises:
    ValueError: alpha outside [0, 1) (here); a `row_axes` path that is not a
      leaf of the base or a count outside [1, ndim) (`init`); a model that
      does not match the base, naming the leaf's path (`update`); no model
      merged yet (`finalize`).
  """
  alpha = _check_alpha(alpha)
  row_axes = dict(row_axes or {})

  def init(base: PyTree) -> OPCMState:
    _row_axes(base, row_axes)
    zeros = jax.tree.map(
        lambda b: jnp.zeros(np.shape(b), jnp.promote_types(jnp.result_type(b), jnp.float32)), base)
    return OPCMState(base, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

  def update(state: OPCMState, model: PyTree) -> OPCMState:
    try:
      tree.check_same_shapes(state.base, model)
    except ValueError as e:
      raise ValueError(f"model does not match the base: {e}") from None
    rows = _row_axes(state.base, row_axes)
    projected_sum, norm = _opcm_step(state.base, state.projected_sum, model, jnp.float32(alpha), rows)
    return state._replace(projected_sum=projected_sum, norm_sum=state.norm_sum + norm, count=state.count + 1)

  def finalize(state: OPCMState) -> PyTree:
    if int(state.count) == 0:
      raise ValueError("finalize: no model merged yet; call update first")
    return _rescaled(state.base, state.projected_sum, opcm_scaling(state))

  return ContinualMerge(init, update, finalize)


def merge_in_order(
    merger: ContinualMerge,
    base: PyTree,
    models: Sequence[PyTree],
    order: Sequence[int] | None = None,
) -> PyTree:
  """`merger`'s merge of `models` arriving in `order` (default: as given).

  Args:
    merger: a continual merge, e.g. `opcm(alpha=0.5)`.
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    order: a permutation of range(N); models[order[0]] arrives first.

  Returns:
    `merger.finalize` after every model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), or an order that is not a permutation of range(N); and
      the merger's own errors.
  """
  models = tv._check_models(base, models)
  order = list(range(len(models))) if order is None else [int(i) for i in order]
  if sorted(order) != list(range(len(models))):
    raise ValueError(f"order must be a permutation of range({len(models)}), got {order}")
  state = merger.init(base)
  for i in order:
    state = merger.update(state, models[i])
  return merger.finalize(state)
