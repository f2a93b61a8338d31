"""DOGE: task arithmetic with a correction learnt by projected gradient descent.

Wei, Tang, Shen, Hu, Yuan and Cao, "Modeling Multi-Task Model Merging as
Adaptive Projective Gradient Descent", ICML 2025, arXiv 2501.01230: its
data-free objective, shared-subspace projection and task-aware coefficients,
transcribed as FusionBench implements them (`tanganke/fusion_bench`,
`fusion_bench/method/doge_ta/doge_ta.py`, `DOGE_TA_Algorithm`, whose `lamda`,
`subspace` and `K` give the defaults here). The paper's text past its abstract
was not available while this was written, so no equation numbers are given.
Hugging Face PEFT's `projective_merge` differs in one gap per task over the
whole tensor instead of one per output unit.

    merged = mj.merge.doge(base, [v1, v2, v3], scale=0.07)

Every leaf is merged on its own. Its task vectors tau_i = models[i] - base are
read as matrices T_i: f32[rows, cols], the leaf reshaped to
`(-1, shape[-1])`: the last axis is the output axis, all the others are
flattened row-major into the input axis (a Dense kernel `(in, out)` as it is,
a convolution kernel `(kh, kw, c_in, c_out)` as `(kh*kw*c_in, c_out)`, a
vector of n entries as `(1, n)`, a scalar as `(1, 1)`). A `DenseGeneral`
kernel whose output spans several axes (attention's query, key and value
`(embed, heads, head_dim)`) is thus read with only `head_dim` as its output.

1. Task-aware coefficients (the merging coefficients as adaptive learning
   rates): lambda_i = scale / ||T_i||_F, per leaf; 0 for a zero task vector.
2. Data-free objective. The merged task vector with a correction Delta
   (f32[rows, cols], shared by every task) is
   M(Delta) = sum_i lambda_i (T_i + Delta), and each task's gap is the
   first-order change of its loss, with its own task vector standing in for
   its gradient, decomposed over output units c:

       L(Delta) = sum_j sum_c ( sum_r T_j[r, c] (T_j[r, c] - M(Delta)[r, c]) )^2.

3. Shared subspace. Each T_i contributes its top r = floor(m / N) right
   singular vectors (the output space; FusionBench's left singular vectors of
   the `(out, in)` torch weight), m = min(rows, cols). The top
   k = floor(rank_fraction * m) left singular vectors B: f32[cols, k] of their
   concatenation f32[cols, N r] span the subspace the tasks share; directions
   of the concatenation with a zero singular value (when N r < k, or the tasks
   repeat directions) are left out rather than completed arbitrarily.
4. Projective gradient descent: Delta starts at 0 and takes `steps` steps of
   the optax optimiser `optimizer(learning_rate)` (Adam by default), each on
   the gradient with its shared-subspace part removed,
   g <- g - g B B^T, so Delta moves only where no shared knowledge lives
   (with plain SGD it stays orthogonal to the subspace; Adam's per-entry
   scaling of the projected gradient need not).
5. Trim and merge: each task keeps the entries where |T_i| (not
   |T_i + Delta|) reaches its threshold (TIES's trim: the n-th largest
   |tau_i|, n = `keep_count(density, size)`, per leaf with `trim="tensor"`,
   over the whole model with `trim="global"`; FusionBench keeps one entry
   more, the top int(size * K) + 1, over its filtered leaves), and the leaf
   becomes
   base + sum_i lambda_i mask_i (T_i + Delta).

Unlike FusionBench, which merges only the 2-D encoder weights (no norms, no
biases, no embeddings) and keeps every other leaf at the base, every leaf is
merged here; a vector leaf (m = 1) has no shared subspace unless N = 1 and
`rank_fraction` = 1. Task vectors and the optimisation are in float32 and
every merged leaf keeps the base's dtype. The optimisation runs inside one
jit-compiled function per leaf shape (a `jax.lax.fori_loop` over the steps,
whose number is traced: changing it, the scale, the learning rate or the
density compiles nothing; the optimizer, the trim and the shared rank are
static). Each leaf's Delta has its own optimiser state, as FusionBench's 400
Adam steps run layer by layer. With `trim="global"` the thresholds are
`ties_thresholds(base, models, density)`: a merge that sees one leaf at a
time passes them as `thresholds=` and reproduces the in-memory merge.
"""

from collections.abc import Callable, Sequence
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax import tree
from mergejax.merge import task_vectors as tv

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST
Optimizer = Callable[[Any], optax.GradientTransformation]


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
  """(rows, cols) of a leaf read as a matrix: the last axis the columns."""
  cols = shape[-1] if shape else 1
  return math.prod(shape) // cols, cols


def _matrix(x: jax.Array) -> jax.Array:
  """x as f32[rows, cols] (`_matrix_shape`)."""
  return x.reshape(_matrix_shape(x.shape))


def _shared_rank(rank_fraction: float, m: int) -> int:
  """k = floor(rank_fraction * m), ignoring float error below 1e-6."""
  return math.floor(rank_fraction * m + 1e-6)


def _coefficients(taus: jax.Array, scale: jax.Array) -> jax.Array:
  """lambda: f32[N], scale / ||tau_i||_F, and 0 where tau_i = 0.

  Args:
    taus: f32[N, ...], the task vectors of one leaf.
    scale: the global factor (FusionBench's `lamda`).
  """
  norms = jnp.sqrt(jnp.sum(jnp.square(taus.reshape(len(taus), -1)), axis=1))
  return jnp.where(norms > 0, scale / norms, 0)


def _objective(matrices: jax.Array, coefficients: jax.Array, delta: jax.Array) -> jax.Array:
  """L(Delta) = sum_j sum_c (sum_r T_j[r, c] (T_j - M(Delta))[r, c])^2.

  Args:
    matrices: T: f32[N, rows, cols], the task vectors.
    coefficients: lambda: f32[N].
    delta: Delta: f32[rows, cols].
  """
  merged = jnp.sum(coefficients[:, None, None] * (matrices + delta), axis=0)
  gaps = jnp.sum(matrices * (matrices - merged), axis=1)  # f32[N, cols]
  return jnp.sum(jnp.square(gaps))


def _shared_basis(matrices: jax.Array, k: int) -> jax.Array:
  """B: f32[cols, w], an orthonormal basis of the tasks' shared output subspace.

  Each T_i gives its top r = floor(m / N) right singular vectors; B is the
  first w = min(k, N r) left singular vectors of their concatenation, a column
  set to 0 where its singular value is 0 (to float precision).

  Args:
    matrices: T: f32[N, rows, cols].
    k: the subspace's rank, at most m = min(rows, cols).
  """
  num, rows, cols = matrices.shape
  per_task = min(rows, cols) // num
  width = min(k, num * per_task)
  if width == 0:
    return jnp.zeros((cols, 0), matrices.dtype)
  _, _, vh = jnp.linalg.svd(matrices, full_matrices=False)  # f32[N, m, cols]
  tops = vh[:, :per_task].reshape(num * per_task, cols).T  # f32[cols, N r]
  u, s, _ = jnp.linalg.svd(tops, full_matrices=False)
  tolerance = s[0] * max(tops.shape) * jnp.finfo(s.dtype).eps
  return u[:, :width] * (s[:width] > tolerance)


def _project(grad: jax.Array, basis: jax.Array) -> jax.Array:
  """g - g B B^T: the gradient f32[rows, cols] less its shared-subspace part."""
  along = jnp.matmul(grad, basis, precision=HIGHEST)
  return grad - jnp.matmul(along, basis.T, precision=HIGHEST)


@functools.partial(jax.jit, static_argnames="optimizer")
def _correction(
    matrices: jax.Array,
    coefficients: jax.Array,
    basis: jax.Array,
    learning_rate: jax.Array,
    steps: jax.Array,
    *,
    optimizer: Optimizer,
) -> jax.Array:
  """Delta: f32[rows, cols] after `steps` projected optimiser steps from 0.

  The steps are a `jax.lax.fori_loop` with a traced trip count, so another
  number of steps compiles nothing.
  """
  transform = optimizer(learning_rate)
  grad = jax.grad(_objective, argnums=2)

  def step(_, carry):
    delta, state = carry
    g = _project(grad(matrices, coefficients, delta), basis)
    updates, state = transform.update(g, state, delta)
    return optax.apply_updates(delta, updates), state

  delta = jnp.zeros(matrices.shape[1:], matrices.dtype)
  delta, _ = jax.lax.fori_loop(0, steps, step, (delta, transform.init(delta)))
  return delta


@functools.partial(jax.jit, static_argnames=("k", "optimizer"))
def _doge_leaf(b, xs, thresholds, keep, scale, learning_rate, steps, *, k, optimizer):
  """DOGE at one leaf; thresholds: f32[N], or None to trim the leaf's own top `keep`."""
  taus = tv._leaf_task_vectors(b, xs, None, 1.0)
  matrices = jax.vmap(_matrix)(taus)
  coefficients = _coefficients(taus, scale)
  delta = _correction(
      matrices, coefficients, _shared_basis(matrices, k), learning_rate, steps,
      optimizer=optimizer,
  ).reshape(b.shape)
  if thresholds is None:
    thresholds = tv._kth_largest(jnp.abs(taus).reshape(len(xs), -1), keep)
  kept = jnp.abs(taus) >= tv._per_model(thresholds, b.ndim)
  adjusted = jnp.where(kept, taus + delta, 0)
  return tv._rebase(b, jnp.sum(tv._per_model(coefficients, b.ndim) * adjusted, axis=0))


def _check_steps(steps: int) -> int:
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
    raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
  return int(steps)


def _check_learning_rate(learning_rate: float) -> float:
  if not (math.isfinite(learning_rate) and learning_rate > 0):
    raise ValueError(f"learning_rate must be finite and > 0, got {learning_rate}")
  return float(learning_rate)


def _check_rank_fraction(rank_fraction: float) -> float:
  if not 0 <= rank_fraction <= 1:
    raise ValueError(f"rank_fraction must be in [0, 1], got {rank_fraction}")
  return float(rank_fraction)


def _check_optimizer(optimizer: Optimizer) -> Optimizer:
  if not callable(optimizer):
    raise ValueError(
        f"optimizer must be a callable learning_rate -> optax.GradientTransformation"
        f" (optax.adam, optax.sgd), got {optimizer!r}"
    )
  return optimizer


def doge(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    scale: float = 0.07,
    steps: int = 400,
    learning_rate: float = 1e-4,
    rank_fraction: float = 1 / 6,
    density: float = 0.3,
    trim: str = "global",
    thresholds: Sequence[float] | None = None,
    optimizer: Optimizer = optax.adam,
) -> PyTree:
  """DOGE (Wei et al., ICML 2025): see the module docstring for the equations.

  Each leaf becomes base + sum_i lambda_i mask_i (tau_i + Delta), with
  lambda_i = scale / ||tau_i|| (per leaf), Delta the shared correction that
  `steps` projected optimiser steps from 0 give on the data-free objective,
  and mask_i TIES's trim of tau_i. With `steps=0` and `density=1` this is
  task arithmetic with the per-leaf scales lambda_i.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    scale: eta, the global factor of the task-aware coefficients (FusionBench's
      `lamda`, 0.07 for ViT-B/32 on 8 tasks); each merged leaf's task vectors
      enter with norm eta, so it is tuned per model family.
    steps: the optimiser steps on Delta (FusionBench: 400 per layer).
    learning_rate: the optimiser's learning rate (FusionBench: Adam, 1e-4).
    rank_fraction: the shared subspace's rank as a fraction of min(rows,
      cols), in [0, 1] (FusionBench's 1 / `subspace`, 1/6); 0 projects nothing.
    density: the fraction of each task vector's entries kept, in (0, 1]
      (FusionBench's K = 30%); 1 keeps all.
    trim: "global" (each model's top entries over all its leaves, as
      FusionBench) or "tensor" (per leaf).
    thresholds: with `trim="global"`, each model's threshold given explicitly
      (`ties_thresholds(base, models, density)`, what None computes); a merge
      that sees one leaf at a time passes them. `density` is then unused.
    optimizer: learning_rate -> optax.GradientTransformation (`optax.adam`,
      `optax.sgd`, ...), called inside jit with a traced learning rate and
      applied to each leaf's Delta on its own.

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), a non-finite scale, steps not an integer >= 0, a learning
      rate not finite and > 0, rank_fraction outside [0, 1], density outside
      (0, 1], an unknown trim, bad thresholds (as `ties`), or an optimizer
      that is not callable.
  """
  models = tv._check_models(base, models)
  scale = tv._check_scale(scale)
  steps = _check_steps(steps)
  learning_rate = _check_learning_rate(learning_rate)
  rank_fraction = _check_rank_fraction(rank_fraction)
  density = tv._check_density(density)
  tv._check_trim(trim, thresholds, len(models))
  optimizer = _check_optimizer(optimizer)
  if trim == "global" and thresholds is None:
    k = tv.keep_count(density, tree.num_params(base))
    thresholds = tv._global_thresholds(base, models, k, None, 1.0)
  if thresholds is not None:
    thresholds = jnp.asarray(thresholds, jnp.float32)

  def leaf(b, xs, _):
    if np.size(b) == 0:
      return b
    rows, cols = _matrix_shape(np.shape(b))
    return _doge_leaf(
        b, xs, thresholds, tv.keep_count(density, np.size(b)), scale, learning_rate, steps,
        k=_shared_rank(rank_fraction, min(rows, cols)), optimizer=optimizer,
    )

  return tv._map_leaves(leaf, base, models, None)
