"""Closed-form least squares for the layers of a merged model.

Every layer of a PLeaS merge is fitted so its outputs match the originals'
(DESIGN.md, How PLeaS works here, step 4):

    minimise ||X W - Y||^2 + lam ||W - W0||^2,   lam = ridge * tr(X^T X) / d

where X holds the merged model's inputs of the layer and Y the targets, both
laid out `[(a + b) / 2 | a only | b only]` from the original models' features.
All of it comes from one Gram matrix of the concatenated original inputs,
`Z = [X_a | X_b]` (`mergejax.stats.gram`): the merged inputs are `Z T` for a
sparse map T (`combine.merge_side`), and the targets are linear in Z too
(`Y_s = X_s W_s` for the layer's own kernel, before its bias). Each of the
three output blocks (merged, A only, B only) reads its own input columns (an
output kept from A reads no input kept only from B), so a layer is three
Cholesky solves on Gram sub-matrices.

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

  Args:
    gram: f32[d, d].
    cross: f32[d, k].
    w0: f32[d, k], the weights the ridge pulls towards.
    ridge: relative: `lam = ridge * tr(gram) / d`.
    where: the layer, for the warning when the Cholesky factorisation fails
      (then the system is solved in float64 on the host).

  Returns:
    f32[d, k].
  """
  a, b = _ridge_system(gram, cross, w0, ridge)
  w = _cholesky_solve(a, b)
  if bool(jnp.all(jnp.isfinite(w))):
    return w
  warnings.warn(f"{where}: the Cholesky factorisation of the Gram matrix failed (d={gram.shape[0]},"
                f" ridge={ridge}); solving in float64 on the host", RuntimeWarning, stacklevel=2)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return jnp.asarray(scipy.linalg.lstsq(a64, b64)[0], jnp.float32)


def _ridge_system(gram: jax.Array, cross: jax.Array, w0: jax.Array, ridge: float) -> tuple[jax.Array, jax.Array]:
  """(G + lam I, C + lam W0): the normal equations of `ridge_solve`."""
  d = gram.shape[0]
  lam = ridge * jnp.trace(gram) / d
  return gram + lam * jnp.eye(d, dtype=gram.dtype), cross + lam * w0


def _cholesky_solve(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^-1 b for a symmetric positive definite `a` (NaN where it is not)."""
  with jax.default_matmul_precision("highest"):
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a), b)


class LayerReport(NamedTuple):
  """Diagnostics of one layer's solve.

  Attributes:
    path: the kernel.
    residual_before: ||X W0 - Y||^2 / ||Y||^2, at the combined weights.
    residual_after: the same at the solution.
    condition: the largest condition number of the blocks' Gram matrices.
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


def _as_matrix(x: jax.Array, split_shape: Sequence[int], rows: Sequence[int], cols: Sequence[int]) -> jax.Array:
  x = jnp.transpose(jnp.reshape(x, split_shape), list(rows) + list(cols))
  d = int(np.prod([split_shape[p] for p in rows], dtype=np.int64))
  return x.reshape(d, -1)


def _from_matrix(w: jax.Array, split_shape: Sequence[int], rows: Sequence[int], cols: Sequence[int],
                 shape: Sequence[int]) -> jax.Array:
  order = list(rows) + list(cols)
  w = w.reshape([split_shape[p] for p in order])
  return jnp.reshape(jnp.transpose(w, np.argsort(order)), shape)


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


def _merge_two_sided(m: jax.Array, rows: _Side, r_model: int, cols: _Side, c_model: int) -> jax.Array:
  """T_rows^T M T_cols (unnormalised): a matrix's rows and columns merged."""
  x = m.reshape(rows.shape + cols.shape)
  x, _ = combine.merge_side(x, rows.axes, r_model)
  shifted = tuple(ax._replace(axis=ax.axis + len(rows.shape)) for ax in cols.axes)
  x, _ = combine.merge_side(x, shifted, c_model)
  d = int(np.prod(x.shape[:len(rows.shape)], dtype=np.int64))
  return x.reshape(d, -1)


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
    condition: compute the blocks' condition numbers (an eigendecomposition each).
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
    return x if axis is None else jax.lax.slice_in_dim(jnp.asarray(x), start, stop, axis=axis)

  solved, before, after, total, cond, sizes, at = [], 0.0, 0.0, 0.0, 0.0, np.zeros(3, int), 0
  for piece in pieces:
    width = 0 if axis is None else piece.view.merged_shape(widths)[axis]
    out = _solve_view(path, gram, [cut(k, piece.start, piece.stop) for k in kernels], cut(w0, at, at + width),
                      piece.view, plan, maps, **kw)
    at += width
    solved.append(out[0])
    before, after, total = before + out[1], after + out[2], total + out[3]
    cond, sizes = max(cond, out[4]), sizes + np.asarray(out[5])
  kernel = solved[0] if axis is None else jnp.concatenate(solved, axis=axis)
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
) -> tuple[jax.Array, float, float, float, float, tuple[int, int, int]]:
  """`solve_layer` for one piece, with `solve_layer`'s arguments (`view` one
  `combine.leaf_view`): (kernel, summed residual terms before and after,
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

  def fit(gram_matrix, count, w_a, w_b, w0):
    """The blocks' solutions, all in one compiled program."""
    count = jnp.maximum(count, 1.0)
    starts = {"m": 0, 0: d_m, 1: d_m + d}
    size = {"m": d_m, 0: d, 1: d}
    block = lambda s, t: gram_matrix[starts[s]:starts[s] + size[s], starts[t]:starts[t] + size[t]] / count
    w = [_as_matrix(k, view.shape, rows_pos, cols_pos) for k in (w_a, w_b)]
    w0_mat = _as_matrix(w0, merged_split, rows_pos, cols_pos)
    n_in = np.where(sum(in_mass) > 0, sum(in_mass), 1.0)
    n_out = np.where(sum(out_mass) > 0, sum(out_mass), 1.0)
    with jax.default_matmul_precision("highest"):
      if merged_inputs:
        x_m = _Side((d_m,), ())
        g_m = block("m", "m")
        cross = sum(_merge_two_sided(block("m", t) @ w[t], x_m, t, y_side, t) for t in models) / n_out
      else:
        g_m = sum(_merge_two_sided(block(s, t), x_side, s, x_side, t) for s in (0, 1) for t in (0, 1))
        g_m = g_m / np.outer(n_in, n_in)
        cross = sum(_merge_two_sided(block(s, t) @ w[t], x_side, s, y_side, t) for s in (0, 1) for t in models)
        cross = cross / np.outer(n_in, n_out)
      yty = sum(_merge_two_sided(w[s].T @ block(s, t) @ w[t], y_side, s, y_side, t)
                for s in models for t in models)
      total = jnp.sum(jnp.diag(yty) / n_out**2)
      solution = jnp.zeros_like(w0_mat)
      out = {"finite": [], "before": [], "after": [], "condition": []}
      for p, q in blocks:
        g_c, c_c, w0_c = g_m[np.ix_(p, p)], cross[np.ix_(p, q)], w0_mat[np.ix_(p, q)]
        w_c = _cholesky_solve(*_ridge_system(g_c, c_c, w0_c, ridge))
        solution = solution.at[np.ix_(p, q)].set(w_c)
        out["finite"].append(jnp.all(jnp.isfinite(w_c)))
        out["before"].append(_residual(g_c, c_c, w0_c))
        out["after"].append(_residual(g_c, c_c, w_c))
        if condition:
          e = jnp.linalg.eigvalsh(g_c)
          out["condition"].append(e[-1] / jnp.maximum(e[0], 1e-30 * e[-1]))
    return solution, total, out, (g_m, cross, w0_mat)

  key = _static_key((d_m, d, view.shape, rows_pos, cols_pos, merged_split, x_side, y_side, blocks, tuple(models),
                      float(ridge), condition, merged_inputs))
  compiled = _FITS.pop(key, None) or jax.jit(fit)
  _FITS[key] = compiled  # most recent last
  while len(_FITS) > _MAX_FITS:
    _FITS.pop(next(iter(_FITS)))
  solution, total, out, system = compiled(gram.gram, gram.count, *kernels, w0)
  out = jax.device_get(out)
  after = out["after"]
  for i, (p, q) in enumerate(blocks):
    if not out["finite"][i]:  # the float64 fallback, with its warning
      g_c, c_c, w0_c = (m[np.ix_(p, r)] for m, r in zip(system, (p, q, q)))
      w_c = ridge_solve(g_c, c_c, w0_c, ridge, where)
      solution = solution.at[np.ix_(p, q)].set(w_c)
      after[i] = float(_residual(g_c, c_c, w_c))
  kernel = _from_matrix(solution, merged_split, rows_pos, cols_pos, w0.shape).astype(w0.dtype)
  return (kernel, float(sum(out["before"])), float(sum(after)), float(total),
          float(max(out["condition"], default=0.0)), tuple(sizes))


# `_solve_view`'s compiled programs by everything their closure reads: a layer of the same structure (the
# same kernel, views and UnitMaps, e.g. a scanned model's copy and its unrolled twin) compiles once.
_FITS: dict[Any, Any] = {}
_MAX_FITS = 64


def _static_key(x: Any) -> Any:
  """A hashable key of nested tuples, lists, NamedTuples and arrays (their shape, dtype and bytes)."""
  if isinstance(x, np.ndarray):
    return ("array", x.shape, x.dtype.str, x.tobytes())
  if isinstance(x, (list, tuple)):
    return (type(x).__name__,) + tuple(_static_key(v) for v in x)
  return x


def _residual(gram: jax.Array, cross: jax.Array, w: jax.Array) -> jax.Array:
  """||X W - Y||^2 - ||Y||^2 = tr(W^T G W) - 2 tr(W^T C)."""
  return jnp.sum(w * (gram @ w)) - 2 * jnp.sum(w * cross)
