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
Cholesky solves on Gram sub-matrices, run where the Gram lives
(`solve_layer(..., backend=None)`): on the host for a CPU Gram (NumPy
gathers, BLAS and LAPACK: nothing is compiled), else one jitted program per
block on its device (compiled once per distinct block shape).

    plan = kernel_plan(use, kernel.shape)
    rows = design_rows(use, kernel.shape)     # f32[batch, positions, d]
    w = ridge_solve(gram, cross, w0, ridge)   # == lstsq([X; sqrt(lam) I], [Y; sqrt(lam) W0])

A convolution's rows are its input patches, features ordered (C, kh, kw)
as `lax.conv_general_dilated_patches` orders them (cut by strided slices,
one per window tap, where the input is not dilated); `kernel_plan` orders
the kernel's axes the same way.
"""

from collections.abc import Mapping, Sequence
import functools
import itertools
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
    if all(d == 1 for d in p["lhs_dilation"]):
      return _patches_by_slices(x, tuple(kernel_shape[a] for a in dn.rhs_spec[2:]), p["window_strides"],
                                p["padding"], p["rhs_dilation"], dn)
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


def _patches_by_slices(x: jax.Array, window: Sequence[int], strides: Sequence[int], padding: Sequence[tuple[int, int]],
                       dilation: Sequence[int], dn: Any) -> jax.Array:
  """`conv_general_dilated_patches`'s rows (features (C, window...), positions in the output's layout order) from
  one strided slice of the padded input per window tap: f32[batch, positions, C * prod(window)].

  XLA lowers `conv_general_dilated_patches` to a convolution with a one-hot kernel, 2 rows d^2 FLOPs (as many as
  the Gram of its rows); slices copy the rows and compute nothing.
  """
  lhs = dn.lhs_spec
  x = jnp.transpose(x, (lhs[0], *lhs[2:], lhs[1]))  # [batch, spatial..., C]
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)])
  spatial = x.shape[1:-1]
  out = [(n - (k - 1) * r - 1) // s + 1 for n, k, r, s in zip(spatial, window, dilation, strides)]
  taps = []
  for offsets in itertools.product(*(range(k) for k in window)):
    start = [0, *(o * r for o, r in zip(offsets, dilation)), 0]
    limit = [x.shape[0], *(b + (m - 1) * s + 1 for b, m, s in zip(start[1:-1], out, strides)), x.shape[-1]]
    taps.append(jax.lax.slice(x, start, limit, (1, *strides, 1)))
  rows = jnp.stack(taps, -1)  # [batch, out spatial..., C, taps]
  order = [1 + int(i) for i in np.argsort(dn.out_spec[2:])]  # the output layout's order of the spatial axes
  rows = jnp.transpose(rows, (0, *order, rows.ndim - 2, rows.ndim - 1))
  return rows.reshape(rows.shape[0], -1, rows.shape[-2] * rows.shape[-1])


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


def _ridge_lam(gram: np.ndarray, ridge: float) -> np.float32:
  """lam = ridge * tr(G) / d."""
  return np.float32(ridge * np.trace(gram, dtype=np.float64) / max(gram.shape[0], 1))


def _ridge_system(gram: np.ndarray, cross: np.ndarray, w0: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
  """(G + lam I, C + lam W0): the normal equations of `ridge_solve`, float32."""
  lam = _ridge_lam(gram, ridge)
  a = gram.copy()
  a[np.diag_indices_from(a)] += lam
  return a, cross + lam * w0


def _host_solve(a: np.ndarray, b: np.ndarray, ridge: float, where: str) -> tuple[np.ndarray, Any]:
  """(a^-1 b in float32, the Cholesky factor or None): float32 LAPACK with one step of iterative
  refinement (the residual in float64), or float64 least squares (with a warning) where the
  factorisation fails."""
  try:
    with _one_thread():
      factor = scipy.linalg.cho_factor(a, lower=True, check_finite=False)
      w = scipy.linalg.cho_solve(factor, b, check_finite=False)
    # The residual's product runs on every BLAS thread (a matrix product, unlike the factorisation, gains).
    residual = np.asarray(b, np.float64) - np.asarray(a, np.float64) @ np.asarray(w, np.float64)
    with _one_thread():
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
      (estimated from below by power iterations; 1e30 for a singular one;
      0 where no block needed a solve: a layer kept whole, `_own_solution`).
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


def _as_matrix(x: Any, split_shape: Sequence[int], rows: Sequence[int], cols: Sequence[int], xp: Any = np) -> Any:
  """An array's split axes `rows` times `cols` as a matrix, on the host (`xp` NumPy) or its device (jax.numpy)."""
  x = xp.transpose(xp.reshape(xp.asarray(x), split_shape), list(rows) + list(cols))
  d = int(np.prod([split_shape[p] for p in rows], dtype=np.int64))
  return x.reshape(d, -1)


def _from_matrix(w: Any, split_shape: Sequence[int], rows: Sequence[int], cols: Sequence[int],
                 shape: Sequence[int], xp: Any = np) -> Any:
  """`_as_matrix`'s inverse: the matrix back in an array of `shape`."""
  order = list(rows) + list(cols)
  w = w.reshape([split_shape[p] for p in order])
  return xp.reshape(xp.transpose(w, np.argsort(order)), shape)


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
    backend: str | None = None,
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
    backend: "host" (NumPy, SciPy's sparse merge matrices and LAPACK: nothing
      compiled), "device" (one jitted program per block on the Gram's device,
      compiled once per distinct block shape), or None: "device" when the
      Gram is a jax.Array off the CPU, else "host" (a GPU or TPU then never
      copies its Grams to the host).

  Returns:
    The merged kernel (shape of `w0`) and its LayerReport.

  Raises:
    NotImplementedError: for a kernel whose parts cut an input (contracted) axis.
  """
  backend = combine.pick_backend(backend, [gram.gram], "solve_layer")
  kw = dict(models=models, ridge=ridge, condition=condition, merged_inputs=merged_inputs, backend=backend)
  xp = np if backend == "host" else jnp
  pieces = [combine.Piece(None, 0, 0, view)] if isinstance(view, combine.LeafView) else list(view)
  axis = pieces[0].axis
  if axis is not None and axis in plan.in_axes:
    raise NotImplementedError(f"{'/'.join(path)}: parts of axis {axis}, an input axis of the kernel; the"
                              " least squares lays out parts of output axes only")
  widths = {g: m.width for g, m in maps.items()}

  def cut(x, start, stop):
    return x if axis is None else xp.asarray(x).take(np.arange(start, stop), axis=axis)

  solved, before, after, total, cond, sizes, at = [], 0.0, 0.0, 0.0, 0.0, np.zeros(3, int), 0
  for piece in pieces:
    width = 0 if axis is None else piece.view.merged_shape(widths)[axis]
    out = _solve_view(path, gram, [cut(k, piece.start, piece.stop) for k in kernels], cut(w0, at, at + width),
                      piece.view, plan, maps, **kw)
    at += width
    solved.append(out[0])
    before, after, total = before + out[1], after + out[2], total + out[3]
    cond, sizes = max(cond, out[4]), sizes + np.asarray(out[5])
  kernel = jax.device_put(solved[0] if axis is None else xp.concatenate(solved, axis=axis))
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
    backend: str = "host",
) -> tuple[Any, float, float, float, float, tuple[int, int, int]]:
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
  # The merge matrices normalised: merged input p is sum_s X_s l_in[s][:, p], merged target q is
  # sum_t X_t W_t l_out[t][:, q] (only the models in `models` reach a target).
  n_in, n_out = (np.where(sum(m) > 0, sum(m), 1.0).astype(np.float32) for m in (in_mass, out_mass))
  l_in = scipy.sparse.vstack([_merge_matrix(x_side, s) @ scipy.sparse.diags(1 / n_in) for s in (0, 1)],
                             format="csc")
  l_out = [_merge_matrix(y_side, t) @ scipy.sparse.diags(1 / n_out) if t in models else None for t in (0, 1)]
  systems = _host_systems if backend == "host" else _device_systems
  solved = systems(where, gram, kernels, w0, blocks, l_in, l_out, (view.shape, merged_split, rows_pos, cols_pos),
                   d_m=d_m, d=d, ridge=ridge, condition=condition, merged_inputs=merged_inputs,
                   merged_block=sizes[0] > 0)
  return (*solved, tuple(sizes))


def _reads(l_out: Sequence[Any], q: np.ndarray) -> list[tuple[int, scipy.sparse.csc_array]]:
  """(t, l_out[t][:, q]) for each model t whose outputs reach the targets `q`."""
  return [(t, m[:, q]) for t, m in enumerate(l_out) if m is not None and m[:, q].nnz]


def _host_systems(where, gram, kernels, w0, blocks, l_in, l_out, layout, *, d_m, d, ridge, condition,
                  merged_inputs, merged_block) -> tuple[np.ndarray, float, float, float, float]:
  """The blocks' normal equations and solutions on the host: (kernel, before, after, ||Y||^2, condition).

  Each block multiplies only the Gram rows it reads: all of model s's where s reaches the block's targets
  (||Y_q||^2 needs them), else those of the merged inputs the block reads (a block of outputs kept from A
  reads B's rows of the merged inputs, and nothing of B's where no input is merged). A block that reads only
  one model's whole inputs for that model's targets keeps its combined weights (`_own_solution`): no
  factorisation, residual 0 (half of a ResNet-50 at budget 1.5 is kept whole).
  """
  split, merged_split, rows_pos, cols_pos = layout
  count = np.float32(max(float(gram.count), 1.0))
  g = np.asarray(gram.gram, np.float32)
  start = {0: d_m, 1: d_m + d}
  w = [_as_matrix(k, split, rows_pos, cols_pos).astype(np.float32) for k in kernels]
  w0_mat = _as_matrix(w0, merged_split, rows_pos, cols_pos).astype(np.float32)
  solution = np.zeros(w0_mat.shape, np.float32)
  before, after, total, worst = 0.0, 0.0, 0.0, 0.0
  for i, (p, q) in enumerate(blocks):
    wq = {}
    for t, m in _reads(l_out, q):  # W_t l_out[t][:, q]: f32[d, q]
      idx, wt = _gathers(m)
      wq[t] = _merge_axis(w[t], idx, wt, axis=1)
    if merged_inputs:
      g_c = g[np.ix_(p, p)] / count
      c_c = sum(g[p, start[t]:start[t] + d] @ wq[t] for t in wq) / count
      for s in wq:
        total += float(np.sum(wq[s] * sum(g[start[s]:start[s] + d, start[t]:start[t] + d] @ wq[t] for t in wq),
                              dtype=np.float64)) / float(count)
    else:
      in_idx, in_wt = _gathers(l_in[:, p])  # merged input p: sum_j in_wt[p, j] Z[:, in_idx[p, j]]
      read = np.zeros(2 * d, bool)
      read[in_idx[in_wt != 0]] = True
      h, block_total = np.zeros((2 * d, q.size), np.float32), 0.0
      for s in (0, 1):
        rows = np.arange(d) if s in wq else np.flatnonzero(read[s * d:(s + 1) * d])
        if not rows.size:
          continue
        block = slice(s * d, (s + 1) * d) if s in wq else s * d + rows
        h[block] = sum(g[block, t * d:(t + 1) * d] @ wq[t] for t in wq) / count  # G_st W_t l_t, read rows only
        if s in wq:  # ||Y_q||^2 = sum_st <W_s l_s, G_st W_t l_t>
          block_total += float(np.sum(wq[s] * h[block], dtype=np.float64))
      total += block_total
      own = _own_solution(in_idx, in_wt, wq, d, w0_mat[np.ix_(p, q)])
      if own is not None:  # W0 reproduces the targets exactly: residual 0, nothing to solve
        solution[np.ix_(p, q)] = own
        before, after = before - block_total, after - block_total
        continue
      c_c = _merge_axis(h, in_idx, in_wt, axis=0)
      g_c = _merge_axis(_merge_axis(g, in_idx, in_wt, axis=0), in_idx, in_wt, axis=1) / count  # l_p^T G l_p
    w0_c = w0_mat[np.ix_(p, q)]
    a, b = _ridge_system(g_c, c_c, w0_c, ridge)
    w_c, factor = _host_solve(a, b, ridge, where)
    solution[np.ix_(p, q)] = w_c
    before += _residual(g_c, c_c, w0_c)
    if factor is None:
      after += _residual(g_c, c_c, w_c)
    else:  # G w = b - lam w to the refined solve's accuracy: no product with the Gram
      after += float(np.sum(w_c * (b - _ridge_lam(g_c, ridge) * w_c), dtype=np.float64)
                     - 2 * np.sum(w_c * c_c, dtype=np.float64))
    # The merged block (first, when it has outputs) reads every input row any other block reads, so by
    # Cauchy interlacing its condition number is the largest.
    if condition and (i == 0 or not merged_block):
      worst = max(worst, _condition(g_c, factor, ridge))
  kernel = _from_matrix(solution, merged_split, rows_pos, cols_pos, w0.shape).astype(np.asarray(w0).dtype)
  return kernel, before, after, total, worst


def _own_solution(in_idx: np.ndarray, in_wt: np.ndarray, wq: Mapping[int, np.ndarray], d: int,
                  w0_c: np.ndarray) -> np.ndarray | None:
  """`w0_c` where it is the block's exact solution, else None.

  A block whose inputs are one model's own features, each once at weight one
  and all d of them (`in_idx`, `in_wt`: its merged inputs as gathers from
  `[X_a | X_b]`), and whose targets read only that model (`wq` has one key
  s) is fitted exactly by `W_s l_s` with its rows in the inputs' order: a
  layer kept whole from a model whose inputs are kept whole. When the
  combined weights `w0_c` are those (they are, unless a caller passed
  others), the ridge's solution is `w0_c` itself, for any Gram.
  """
  if len(wq) != 1 or in_idx.shape[0] != d:
    return None
  (s,) = wq
  live = in_wt != 0
  if not np.all(live.sum(1) == 1):
    return None
  j = live.argmax(1)
  cols, weights = in_idx[np.arange(d), j] - s * d, in_wt[np.arange(d), j]
  if not (np.all(weights == 1) and np.array_equal(np.sort(cols), np.arange(d))):
    return None
  exact = wq[s][cols]
  return w0_c if np.array_equal(exact, w0_c) else None


def _device_systems(where, gram, kernels, w0, blocks, l_in, l_out, layout, *, d_m, d, ridge, condition,
                    merged_inputs, merged_block) -> tuple[jax.Array, float, float, float, float]:
  """`_host_systems` on the Gram's device: each block one jitted program (`_device_block`), compiled once per
  distinct block shape, the merge matrices passed as gather indices and weights; a block whose Cholesky
  factorisation fails is solved again by the host's float64 fallback."""
  split, merged_split, rows_pos, cols_pos = layout
  g = jnp.asarray(gram.gram, jnp.float32)
  count = jnp.maximum(jnp.asarray(gram.count, jnp.float32), 1.0)
  w = jnp.stack([_as_matrix(jnp.asarray(k, jnp.float32), split, rows_pos, cols_pos, jnp) for k in kernels])
  w0_mat = _as_matrix(jnp.asarray(w0, jnp.float32), merged_split, rows_pos, cols_pos, jnp)
  solution = jnp.zeros(w0_mat.shape, jnp.float32)
  before, after, total, worst = 0.0, 0.0, 0.0, 0.0
  for i, (p, q) in enumerate(blocks):
    # Merged input p reads Gram features in_idx[p] (of [X_m] with merged inputs, else of [X_a | X_b]).
    in_idx, in_wt = _gathers(scipy.sparse.identity(d_m, np.float32, format="csc")[:, p] if merged_inputs
                             else l_in[:, p])
    out = [_gathers(m[:, q] if m is not None else scipy.sparse.csc_array((w.shape[2], q.size), dtype=np.float32))
           for m in l_out]
    width = max(o[0].shape[1] for o in out)
    out_idx = np.stack([np.pad(o[0], ((0, 0), (0, width - o[0].shape[1]))) for o in out])
    out_wt = np.stack([np.pad(o[1], ((0, 0), (0, width - o[1].shape[1]))) for o in out])
    want_condition = condition and (i == 0 or not merged_block)
    w_c, sums, finite = _device_block(g, count, w, w0_mat[np.ix_(p, q)], in_idx, in_wt, out_idx, out_wt,
                                      jnp.float32(ridge), d_m=d_m, condition=want_condition)
    sums = np.asarray(sums, np.float64)
    if not bool(finite):  # the host's float64 least squares, with its warning
      host = _host_systems(where, gram, kernels, w0, [(p, q)], l_in, l_out, layout, d_m=d_m, d=d, ridge=ridge,
                           condition=want_condition, merged_inputs=merged_inputs, merged_block=False)
      w_c = _as_matrix(jnp.asarray(host[0]), merged_split, rows_pos, cols_pos, jnp)[np.ix_(p, q)]
      sums = np.asarray(host[1:], np.float64)
    solution = solution.at[np.ix_(p, q)].set(w_c)
    before, after, total = before + sums[0], after + sums[1], total + sums[2]
    if want_condition:
      worst = max(worst, float(sums[3]))
  kernel = _from_matrix(solution, merged_split, rows_pos, cols_pos, np.shape(w0), jnp)
  return kernel.astype(jnp.result_type(w0)), before, after, total, worst


def _merge_axis(x: np.ndarray, idx: np.ndarray, wt: np.ndarray, axis: int) -> np.ndarray:
  """sum_j wt[:, j] x.take(idx[:, j], axis): f32, a slice (no copy) where a gather is a contiguous range of
  weight one (an unmerged layout keeps each model's features in order), gathers that weigh nothing skipped."""
  out = None
  for j in range(idx.shape[1]):
    if not np.any(wt[:, j]):
      continue
    col = idx[:, j]
    if np.all(wt[:, j] == 1) and col.size and np.array_equal(col, np.arange(col[0], col[0] + col.size)):
      part = x[(slice(None),) * axis + (slice(col[0], col[0] + col.size),)]
    else:
      part = np.take(x, col, axis=axis) * np.expand_dims(wt[:, j], 1 - axis)
    out = part if out is None else out + part
  if out is None:
    shape = list(x.shape)
    shape[axis] = idx.shape[0]
    return np.zeros(shape, np.float32)
  return np.asarray(out, np.float32)


def _gathers(m: scipy.sparse.csc_array) -> tuple[np.ndarray, np.ndarray]:
  """A sparse matrix's columns as gathers: (int32[columns, k] row indices, f32[columns, k] weights), each
  column's non-zeros padded to the most any column has (weight 0)."""
  m = scipy.sparse.csc_array(m)
  m.sum_duplicates()
  counts = np.diff(m.indptr)
  k = max(int(counts.max(initial=0)), 1)
  idx = np.zeros((m.shape[1], k), np.int32)
  wt = np.zeros((m.shape[1], k), np.float32)
  slot = np.arange(m.indices.size) - np.repeat(m.indptr[:-1], counts)
  col = np.repeat(np.arange(m.shape[1]), counts)
  idx[col, slot], wt[col, slot] = m.indices, m.data
  return idx, wt


@functools.partial(jax.jit, static_argnames=("d_m", "condition"))
def _device_block(gram, count, w, w0_c, in_idx, in_wt, out_idx, out_wt, ridge, *, d_m, condition):
  """One block's normal equations and refined Cholesky solve, on the device.

  Args:
    gram: f32[d_m + 2d, d_m + 2d], the Gram of `[X_m | X_a | X_b]` (d_m = 0: of `[X_a | X_b]`), unnormalised.
    count: its rows.
    w: f32[2, d, k], both models' kernel matrices.
    w0_c: f32[P, Q], the block of the combined kernel.
    in_idx, in_wt: int32[P, K], f32[P, K]: merged input p is sum_j in_wt[p, j] Z[:, in_idx[p, j]].
    out_idx, out_wt: int32[2, Q, J], f32[2, Q, J]: target q is sum_t sum_j out_wt[t, q, j] Y_t[:, out_idx[t, q, j]].
    ridge: relative ridge.

  Returns:
    (f32[P, Q] solution, f32[4] (before, after, ||Y_q||^2, condition), whether the solution is finite).
  """
  dot = functools.partial(jnp.matmul, precision=HIGHEST)
  d = w.shape[1]
  g = gram / count
  wq = jnp.concatenate([jnp.sum(w[t][:, out_idx[t]] * out_wt[t], -1) for t in (0, 1)])  # [W_a l_a; W_b l_b]
  originals = g[d_m:, d_m:]
  h = dot(originals, wq)
  total = jnp.sum(wq * h)
  gather = lambda x: jnp.sum(x[in_idx] * in_wt[..., None], 1)  # rows of x merged: f32[P, ...]
  if d_m:
    c_c = gather(dot(g[:d_m, d_m:], wq))
    g_c = g[:d_m, :d_m][in_idx[:, 0]][:, in_idx[:, 0]]
  else:
    c_c = gather(h)
    rows = gather(originals)
    g_c = jnp.sum(rows[:, in_idx] * in_wt[None], -1)
  lam = ridge * jnp.trace(g_c) / g_c.shape[0]
  a = g_c + lam * jnp.eye(g_c.shape[0], dtype=g_c.dtype)
  b = c_c + lam * w0_c
  factor = jax.scipy.linalg.cho_factor(a, lower=True)
  w_c = jax.scipy.linalg.cho_solve(factor, b)
  w_c = w_c + jax.scipy.linalg.cho_solve(factor, b - dot(a, w_c))
  residual = lambda x: jnp.sum(x * dot(g_c, x)) - 2 * jnp.sum(x * c_c)
  cond = _device_condition(g_c, factor, lam) if condition else jnp.float32(0)
  return w_c, jnp.stack([residual(w0_c), residual(w_c), total, cond]), jnp.all(jnp.isfinite(w_c))


def _device_condition(gram, factor, lam, steps: int = 8, width: int = 8) -> jax.Array:
  """`_condition` in jax: lambda_max of `gram` over lambda_min through its ridged Cholesky `factor`."""
  d = gram.shape[0]
  start = jnp.asarray(np.random.default_rng(0).standard_normal((d, min(width, d))), jnp.float32)
  dot = functools.partial(jnp.matmul, precision=HIGHEST)

  def largest(apply):
    v = jax.lax.fori_loop(0, steps, lambda _, v: jnp.linalg.qr(apply(v))[0], jnp.linalg.qr(start)[0])
    return jnp.linalg.eigvalsh(dot(v.T, apply(v)))[-1]

  big = largest(lambda v: dot(gram, v))
  small = 1.0 / largest(lambda v: jax.scipy.linalg.cho_solve(factor, v)) - lam
  ok = jnp.isfinite(big) & jnp.isfinite(small) & (small > 1e-30 * big)
  return jnp.where(ok, big / jnp.where(ok, small, 1.0), 1e30)


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
