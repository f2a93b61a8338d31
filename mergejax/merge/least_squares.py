"""Closed-form least squares for the layers of a merged model.

Every layer of a PLeaS merge is fitted so its outputs match the originals'
(DESIGN.md, How PLeaS works here, step 4):

    minimise ||X W - Y||^2 + lam ||W - W0||^2,   lam = ridge * tr(X^T X) / d

where X holds the merged model's inputs of the layer and Y the targets, both
laid out `[(a + b) / 2 | a only | b only]` from the original models' features.
All of it comes from one Gram matrix of the concatenated original inputs,
`Z = [X_a | X_b]` (`mergejax.stats.gram`): the merged inputs are `Z T` for a
sparse map T (`_merge_matrix`), and the targets are linear in Z too
(`Y_s = X_s W_s` for the layer's own kernel, before its bias). Each of the
three output blocks (merged, A only, B only) reads its own input columns (an
output kept from A reads no input kept only from B), so a layer is three
Cholesky solves on Gram sub-matrices, run on the host (BLAS, LAPACK and
sparse merge matrices: nothing is compiled per layer).

    plan = kernel_plan(use, kernel.shape)
    rows = design_rows(use, kernel.shape)     # f32[batch, positions, d]
    w = ridge_solve(gram, cross, w0, ridge)   # == lstsq([X; sqrt(lam) I], [Y; sqrt(lam) W0])

A convolution's rows are its input patches from
`lax.conv_general_dilated_patches`, whose features are ordered
(C, kh, kw); `kernel_plan` orders the kernel's axes the same way.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.sparse
import threadpoolctl

from mergejax import stats
from mergejax.merge import combine

HIGHEST = jax.lax.Precision.HIGHEST


class KernelPlan(NamedTuple):
  """A kernel as a matrix: rows its input axes, columns its output axes.

  Attributes:
    in_axes: the kernel axes contracted with the input, in the order of the
      design rows' features.
    out_axes: the kernel axes the output's features come from, in order.
  """

  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]


def kernel_plan(use: Any, kernel_shape: Sequence[int], where: str = "") -> KernelPlan:
  """The matrix view of a kernel from one of its uses (`trace.KernelUse`).

  Raises:
    ValueError: for a use the least squares cannot handle: a grouped or
      batched convolution, a dot_general with batch axes on the kernel or
      contracting the examples axis.
  """
  if use.primitive == "conv_general_dilated":
    p = use.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
      raise ValueError(f"{where}: a grouped convolution (feature_group_count="
                       f"{p['feature_group_count']}) has no dense least-squares form")
    rhs = p["dimension_numbers"].rhs_spec
    return KernelPlan((rhs[1], *rhs[2:]), (rhs[0],))
  contracted = tuple(k for _, k in use.input_axes)
  free = tuple(k for _, k in use.output_axes)
  if len(contracted) + len(free) != len(kernel_shape):
    raise ValueError(f"{where}: a kernel with batch axes (a batched dot_general) is not a layer"
                     " the least squares can fit")
  if any(d == 0 for d, _ in use.input_axes):
    raise ValueError(f"{where}: the layer contracts its input's first axis, which must be the examples")
  return KernelPlan(contracted, free)


def design_rows(use: Any, kernel_shape: Sequence[int]) -> jax.Array:
  """The layer's input as f32[batch, positions, d], features in `kernel_plan` order."""
  x = jnp.asarray(use.input, jnp.float32)
  if use.primitive == "conv_general_dilated":
    p = use.params
    dn = p["dimension_numbers"]
    patches = jax.lax.conv_general_dilated_patches(
        x, tuple(kernel_shape[a] for a in dn.rhs_spec[2:]), p["window_strides"], p["padding"],
        p["lhs_dilation"], p["rhs_dilation"], dn, precision=HIGHEST)
    out = dn.out_spec
    patches = jnp.moveaxis(patches, (out[0], out[1]), (0, -1))
    return patches.reshape(patches.shape[0], -1, patches.shape[-1])
  contracted = [d for d, _ in use.input_axes]
  free = [d for d in range(x.ndim) if d not in contracted]
  x = jnp.transpose(x, free + contracted)
  d = int(np.prod([use.input.shape[a] for a in contracted], dtype=np.int64))
  return x.reshape(x.shape[0], -1, d)


def ridge_solve(gram: jax.Array, cross: jax.Array, w0: jax.Array, ridge: float, where: str = "") -> jax.Array:
  """argmin_W ||X W - Y||^2 + lam ||W - W0||^2 from `gram = X^T X`, `cross = X^T Y`.

  Solved on the host by LAPACK (SciPy's Cholesky, float32): nothing to compile.

  Args:
    gram: f32[d, d].
    cross: f32[d, k].
    w0: f32[d, k], the weights the ridge pulls towards.
    ridge: relative: `lam = ridge * tr(gram) / d`.
    where: the layer, for the warning when the Cholesky factorisation fails
      (then the system is solved in float64 by least squares).

  Returns:
    f32[d, k].
  """
  g, c, w = (np.asarray(x, np.float32) for x in (gram, cross, w0))
  return jax.device_put(_host_solve(*_ridge_system(g, c, w, ridge), ridge, where)[0])


def _one_thread() -> threadpoolctl.threadpool_limits:
  """BLAS on one thread: OpenBLAS's threaded Cholesky and QR ran 4-18x slower than one thread on a busy
  2-core CPU (a 2304 x 2304 factorisation took 2.2-9.5 s against 0.55 s)."""
  return threadpoolctl.threadpool_limits(1, "blas")


def _ridge_system(gram: np.ndarray, cross: np.ndarray, w0: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
  """(G + lam I, C + lam W0): the normal equations of `ridge_solve`, float32."""
  d = gram.shape[0]
  lam = np.float32(ridge * np.trace(gram, dtype=np.float64) / max(d, 1))
  return gram + lam * np.eye(d, dtype=np.float32), cross + lam * w0


def _host_solve(a: np.ndarray, b: np.ndarray, ridge: float, where: str) -> tuple[np.ndarray, Any]:
  """(a^-1 b in float32, the Cholesky factor or None): float32 LAPACK with one step of iterative
  refinement (the residual in float64), or float64 least squares (with a warning) where the
  factorisation fails."""
  try:
    with _one_thread():
      factor = scipy.linalg.cho_factor(a, lower=True, check_finite=False)
      w = scipy.linalg.cho_solve(factor, b, check_finite=False)
      residual = np.asarray(b, np.float64) - np.asarray(a, np.float64) @ np.asarray(w, np.float64)
      w = w + scipy.linalg.cho_solve(factor, residual.astype(np.float32), check_finite=False)
    if np.all(np.isfinite(w)):
      return w.astype(np.float32), factor
  except np.linalg.LinAlgError:
    pass
  warnings.warn(f"{where}: the Cholesky factorisation of the Gram matrix failed (d={a.shape[0]},"
                f" ridge={ridge}); solving in float64 by least squares", RuntimeWarning, stacklevel=3)
  w = scipy.linalg.lstsq(np.asarray(a, np.float64), np.asarray(b, np.float64), check_finite=False)[0]
  return w.astype(np.float32), None


class LayerReport(NamedTuple):
  """Diagnostics of one layer's solve.

  Attributes:
    path: the kernel.
    residual_before: ||X W0 - Y||^2 / ||Y||^2, at the combined weights.
    residual_after: the same at the solution.
    condition: the largest condition number of the blocks' Gram matrices
      (estimated from below by power iterations; 1e30 for a singular one).
    blocks: how many output units each block (merged, A only, B only) has.
  """

  path: tuple[str, ...]
  residual_before: float
  residual_after: float
  condition: float
  blocks: tuple[int, int, int]


def split_positions(view: combine.LeafView, axes: Sequence[int]) -> list[int]:
  """The split-view positions of original axes `axes`, in that order."""
  out = []
  for a in axes:
    start = sum(view.parts[:a])
    out.extend(range(start, start + view.parts[a]))
  return out


def _as_matrix(x: Any, split_shape: Sequence[int], rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
  """An array's split axes `rows` times `cols` as a matrix, on the host."""
  x = np.transpose(np.reshape(np.asarray(x), split_shape), list(rows) + list(cols))
  d = int(np.prod([split_shape[p] for p in rows], dtype=np.int64))
  return x.reshape(d, -1)


def _from_matrix(w: np.ndarray, split_shape: Sequence[int], rows: Sequence[int], cols: Sequence[int],
                 shape: Sequence[int]) -> np.ndarray:
  """`_as_matrix`'s inverse: the matrix back in an array of `shape`."""
  order = list(rows) + list(cols)
  w = w.reshape([split_shape[p] for p in order])
  return np.reshape(np.transpose(w, np.argsort(order)), shape)


class _Side(NamedTuple):
  """The input or output features of a layer: their split shape and grouped axes."""

  shape: tuple[int, ...]
  axes: tuple[combine.Axis, ...]

  def mass(self, model: int) -> np.ndarray:
    """f32[merged size]: model `model`'s weight at each merged feature."""
    merged = list(self.shape)
    for ax in self.axes:
      merged[ax.axis] = ax.map.width
    m = np.ones(merged, np.float32)
    for ax in self.axes:
      weight = combine.model_part(ax.map, model).weight.sum(1)
      m = m * weight.reshape([-1 if d == ax.axis else 1 for d in range(len(merged))])
    return m.reshape(-1)


def _side(view: combine.LeafView, positions: Sequence[int], maps: Mapping[str, combine.UnitMap]) -> _Side:
  groups = dict(view.groups)
  axes = tuple(combine.Axis(i, maps[groups[p]], False) for i, p in enumerate(positions) if p in groups)
  return _Side(tuple(view.shape[p] for p in positions), axes)


def solve_layer(
    path: tuple[str, ...],
    gram: stats.Gram,
    kernels: Sequence[jax.Array],
    w0: jax.Array,
    view: combine.LeafView | Sequence[combine.Piece],
    plan: KernelPlan,
    maps: Mapping[str, combine.UnitMap],
    *,
    models: Sequence[int] = (0, 1),
    ridge: float,
    condition: bool = True,
    merged_inputs: bool = False,
) -> tuple[jax.Array, LayerReport]:
  """One kernel of the merged model, by block least squares.

  Args:
    path: the kernel's path (for messages).
    gram: the Gram of `[X_a | X_b]`, the layer's input rows in both (aligned)
      models, features in `plan` order; with `merged_inputs`, the Gram of
      `[X_m | X_a | X_b]`, `X_m` the merged model's own input rows.
    kernels: `(w_a, w_b)`, the kernel in both aligned models.
    w0: the combined kernel (`combine.combine`), the merged model's shape.
    view: the split view of the original kernel (`combine.leaf_view`), or its
      pieces (`combine.leaf_pieces`: a fused output axis cut into parts, e.g.
      GPT-2's q | k | v); output columns are independent problems on the same
      Gram, so each piece is solved on its own and the pieces concatenated.
    plan: its matrix view (`kernel_plan`).
    maps: group -> UnitMap.
    models: the models whose outputs are the targets ((0,) for A's own head).
    ridge: relative ridge (see `ridge_solve`).
    condition: estimate the blocks' condition numbers (`_condition`: power
      iterations, O(d^2) each).
    merged_inputs: fit on the merged model's inputs (`X_m`) instead of the
      originals' inputs merged like the units.

  Returns:
    The merged kernel (shape of `w0`) and its LayerReport.

  Raises:
    NotImplementedError: for a kernel whose parts cut an input (contracted) axis.
  """
  kw = dict(models=models, ridge=ridge, condition=condition, merged_inputs=merged_inputs)
  pieces = [combine.Piece(None, 0, 0, view)] if isinstance(view, combine.LeafView) else list(view)
  axis = pieces[0].axis
  if axis is not None and axis in plan.in_axes:
    raise NotImplementedError(f"{'/'.join(path)}: parts of axis {axis}, an input axis of the kernel; the"
                              " least squares lays out parts of output axes only")
  widths = {g: m.width for g, m in maps.items()}

  def cut(x, start, stop):
    return x if axis is None else np.asarray(x).take(np.arange(start, stop), axis=axis)

  solved, before, after, total, cond, sizes, at = [], 0.0, 0.0, 0.0, 0.0, np.zeros(3, int), 0
  for piece in pieces:
    width = 0 if axis is None else piece.view.merged_shape(widths)[axis]
    out = _solve_view(path, gram, [cut(k, piece.start, piece.stop) for k in kernels], cut(w0, at, at + width),
                      piece.view, plan, maps, **kw)
    at += width
    solved.append(out[0])
    before, after, total = before + out[1], after + out[2], total + out[3]
    cond, sizes = max(cond, out[4]), sizes + np.asarray(out[5])
  kernel = jax.device_put(solved[0] if axis is None else np.concatenate(solved, axis=axis))
  norm = max(total, 1e-30)
  return kernel, LayerReport(path, (before + total) / norm, (after + total) / norm, cond,
                             tuple(int(s) for s in sizes))


def _solve_view(
    path: tuple[str, ...],
    gram: stats.Gram,
    kernels: Sequence[jax.Array],
    w0: jax.Array,
    view: combine.LeafView,
    plan: KernelPlan,
    maps: Mapping[str, combine.UnitMap],
    *,
    models: Sequence[int] = (0, 1),
    ridge: float,
    condition: bool = True,
    merged_inputs: bool = False,
) -> tuple[np.ndarray, float, float, float, float, tuple[int, int, int]]:
  """`solve_layer` for one piece, with `solve_layer`'s arguments (`view` one
  `combine.leaf_view`), on the host: (kernel, summed residual terms before and after,
  ||Y||^2, the worst condition number, the blocks' sizes)."""
  where = "/".join(path)
  rows_pos, cols_pos = split_positions(view, plan.in_axes), split_positions(view, plan.out_axes)
  x_side, y_side = _side(view, rows_pos, maps), _side(view, cols_pos, maps)
  d = int(np.prod(x_side.shape, dtype=np.int64))
  widths = {g: m.width for g, m in maps.items()}
  merged_split = list(view.shape)
  for p, g in view.groups:
    merged_split[p] = widths[g]
  d_m = int(np.prod([merged_split[p] for p in rows_pos], dtype=np.int64)) if merged_inputs else 0
  expected = (d_m, d, d) if merged_inputs else (d, d)
  if tuple(gram.sizes) != expected:
    raise ValueError(f"{where}: the Gram's feature sizes {gram.sizes} are not the kernel's {expected}")
  # Which merged features each model reaches decides each block's rows and columns.
  in_mass = [x_side.mass(s) for s in (0, 1)]
  out_mass = [y_side.mass(s) if s in models else np.zeros_like(y_side.mass(s)) for s in (0, 1)]
  blocks, sizes = [], []
  for a, b in ((True, True), (True, False), (False, True)):
    q = np.flatnonzero(((out_mass[0] > 0) == a) & ((out_mass[1] > 0) == b))
    sizes.append(int(q.size))
    if q.size:
      blocks.append((np.flatnonzero(((in_mass[0] > 0) & a) | ((in_mass[1] > 0) & b)), q))
  # Every product runs on the host (BLAS, LAPACK and sparse merge matrices): nothing is compiled, so no layer
  # pays a compilation (on a CPU a factorisation compiled by XLA costs more than it computes).
  count = max(float(gram.count), 1.0)
  g = np.asarray(gram.gram, np.float32)
  starts = {"m": 0, 0: d_m, 1: d_m + d}
  size = {"m": d_m, 0: d, 1: d}
  slices = {}

  def block(s, t):  # G_st / count, each block sliced once
    if (s, t) not in slices:
      slices[s, t] = g[starts[s]:starts[s] + size[s], starts[t]:starts[t] + size[t]] / np.float32(count)
    return slices[s, t]

  w = [_as_matrix(k, view.shape, rows_pos, cols_pos).astype(np.float32) for k in kernels]
  w0_mat = _as_matrix(w0, merged_split, rows_pos, cols_pos).astype(np.float32)
  t_in, t_out = ([_merge_matrix(side, s) for s in (0, 1)] for side in (x_side, y_side))
  n_in, n_out = (np.where(sum(m) > 0, sum(m), 1.0).astype(np.float32) for m in (in_mass, out_mass))
  gw = {(s, t): block("m" if merged_inputs else s, t) @ w[t] for s in ((0,) if merged_inputs else (0, 1))
        for t in models}
  yty = sum(_two_sided(w[s].T @ (gw[s, t] if not merged_inputs else block(s, t) @ w[t]), t_out[s], t_out[t])
            for s in models for t in models)
  total = float(np.sum(np.diag(yty) / n_out.astype(np.float64)**2))
  solution = np.zeros(w0_mat.shape, np.float32)
  before, after, worst = 0.0, 0.0, 0.0
  for i, (p, q) in enumerate(blocks):
    if merged_inputs:
      g_c = block("m", "m")[np.ix_(p, p)]
      c_c = sum(gw[0, t] @ t_out[t][:, q] for t in models)[p] / n_out[q]
    else:
      rows = [t_in[s][:, p] for s in (0, 1)]
      g_c = sum(_two_sided(block(s, t), rows[s], rows[t]) for s in (0, 1) for t in (0, 1))
      g_c = g_c / np.outer(n_in[p], n_in[p])
      c_c = sum(_two_sided(gw[s, t], rows[s], t_out[t][:, q]) for s in (0, 1) for t in models)
      c_c = c_c / np.outer(n_in[p], n_out[q])
    g_c, c_c, w0_c = g_c.astype(np.float32), c_c.astype(np.float32), w0_mat[np.ix_(p, q)]
    w_c, factor = _host_solve(*_ridge_system(g_c, c_c, w0_c, ridge), ridge, where)
    solution[np.ix_(p, q)] = w_c
    before, after = before + _residual(g_c, c_c, w0_c), after + _residual(g_c, c_c, w_c)
    # The merged block (first, when it has outputs) reads every input row any other block reads, so by
    # Cauchy interlacing its condition number is the largest.
    if condition and (i == 0 or not sizes[0]):
      worst = max(worst, _condition(g_c, factor, ridge))
  kernel = _from_matrix(solution, merged_split, rows_pos, cols_pos, w0.shape).astype(w0.dtype)
  return kernel, before, after, total, worst, tuple(sizes)


def _merge_matrix(side: _Side, model: int) -> scipy.sparse.csc_array:
  """T: f32[features, merged features], sparse: model `model`'s features merged like the units (unnormalised).

  The Kronecker product, over the side's split axes in order, of the identity
  (an axis no group permutes) or the axis's map (`M[index[p, j], p] +=
  weight[p, j]` over the model's own units).
  """
  grouped = {ax.axis: combine.model_part(ax.map, model) for ax in side.axes}
  t = scipy.sparse.identity(1, np.float32, format="csc")
  for i, n in enumerate(side.shape):
    if i in grouped:
      part = grouped[i]
      width, k = part.index.shape
      m = scipy.sparse.csc_array((part.weight.reshape(-1), (part.index.reshape(-1), np.repeat(np.arange(width), k))),
                                 shape=(n, width), dtype=np.float32)
    else:
      m = scipy.sparse.identity(n, np.float32, format="csc")
    t = scipy.sparse.kron(t, m, format="csc")
  t.eliminate_zeros()
  return t


def _two_sided(m: np.ndarray, rows: scipy.sparse.csc_array, cols: scipy.sparse.csc_array) -> np.ndarray:
  """rows^T m cols: a matrix's rows and columns merged (`_merge_matrix`), f32[rows merged, cols merged]."""
  return np.asarray((cols.T @ (rows.T @ m).T).T, np.float32)


def _condition(gram: np.ndarray, factor: Any, ridge: float, steps: int = 8, width: int = 8) -> float:
  """An estimate of `gram`'s condition number lambda_max / lambda_min, in O(steps d^2).

  lambda_max by subspace iteration (`width` vectors, `steps` steps) on gram:
  f32[d, d]; lambda_min as 1 / mu - lam, mu the same on (gram + lam I)^-1
  through its Cholesky `factor` (`scipy.linalg.cho_factor`'s pair). Each is a
  Rayleigh-Ritz value, so the estimate is a lower bound, exact once the
  iterations converge (an eigendecomposition costs about 20 times a Cholesky
  factorisation on a CPU). A Gram singular to float32 rounding reads about
  1e7 or more, and 1e30 where lambda_min comes out below 1e-30 lambda_max or
  not positive, or the factorisation failed.
  """
  d = gram.shape[0]
  if factor is None:
    return 1e30
  lam = ridge * np.trace(gram, dtype=np.float64) / d
  start = np.random.default_rng(0).standard_normal((d, min(width, d))).astype(np.float32)

  def largest(apply):
    v = np.linalg.qr(start)[0]
    for _ in range(steps):
      v = np.linalg.qr(apply(v))[0]
    return float(np.linalg.eigvalsh((v.T @ apply(v)).astype(np.float64))[-1])

  with _one_thread():
    big = largest(lambda v: gram @ v)
    small = 1.0 / largest(lambda v: scipy.linalg.cho_solve(factor, v, check_finite=False)) - lam
  return big / small if np.isfinite(big) and np.isfinite(small) and small > 1e-30 * big else 1e30


def _residual(gram: np.ndarray, cross: np.ndarray, w: np.ndarray) -> float:
  """||X W - Y||^2 - ||Y||^2 = tr(W^T G W) - 2 tr(W^T C)."""
  return float(np.sum(w * (gram @ w), dtype=np.float64) - 2 * np.sum(w * cross, dtype=np.float64))
