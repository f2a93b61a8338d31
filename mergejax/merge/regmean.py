"""RegMean and RegMean++: merging linear layers by regression on their inputs.

RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of
Language Models", ICLR 2023) merges every linear kernel of N models so the
merged layer's outputs match each model's outputs on that model's own inputs,

    W* = argmin_W sum_i ||X_i W - X_i W_i||^2 = (sum_i G_i)^{-1} sum_i G_i W_i,

with G_i = X_i^T X_i the Gram of the inputs model i's layer reads on model
i's data. Each G_i is shrunk towards its diagonal first,
G~ = alpha G + (1 - alpha) diag(G) (alpha = 1: the plain regression, 0: a
per-input-feature weighted average). Every other variable (biases, norms,
embeddings, kernels without a Gram) is averaged.

    grams = [mj.merge.regmean_grams(model.apply, v, data) for v, data in zip(models, datasets)]
    merged = mj.merge.regmean(models, grams, alpha=0.9)
    merged = mj.merge.regmean_plus_plus(model.apply, models, datasets, alpha=0.9)

A Gram is keyed by its kernel's path and ordered like the kernel's leading
axes flattened row-major: it is the Gram of the rows x that multiply
`kernel.reshape(d_in, -1)`. For a Dense kernel `(in, out)` that is the input
itself; for a Flax convolution kernel `(kh, kw, c_in, c_out)` it is the input
patches in `(kh, kw, c_in)` order (`regmean_grams` reorders the `(c_in, kh,
kw)` features of `lax.conv_general_dilated_patches`).

RegMean++ (Nguyen et al., arXiv 2508.03121) computes each layer's Grams from
the inputs the layer receives once the layers before it are merged; see
`regmean_plus_plus` for exactly what is implemented here.
"""

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
import functools
import numbers
import time
from typing import Any
import warnings

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mergejax import distributed
from mergejax import stats
from mergejax import tree
from mergejax.merge import kernels as kernels_lib

PyTree = Any
Path = tuple[str, ...]
Batches = Iterable[Any] | Callable[[], Iterable[Any]]
HIGHEST = jax.lax.Precision.HIGHEST


def _check_alpha(alpha: Any, where: str) -> None:
  if not (isinstance(alpha, numbers.Real) and 0.0 <= alpha <= 1.0):
    raise ValueError(f"{where}: alpha must be in [0, 1], got {alpha!r}")


def _check_models(models: Sequence[PyTree], where: str) -> None:
  if not models:
    raise ValueError(f"{where}: no models to merge")
  tree.check_same_shapes(*models)
  for i, m in enumerate(models):
    tree.check_finite(m, f"{where}: models[{i}]")


def _input_sizes(shape: Sequence[int]) -> list[int]:
  """The sizes a Gram over the kernel's leading axes can have: prod(shape[:k]), k >= 1."""
  return [int(np.prod(shape[:k], dtype=np.int64)) for k in range(1, len(shape) + 1)]


def _check_grams(grams: Sequence[Mapping[Path, Any]], leaves: Mapping[Path, Any], where: str) -> None:
  """Every Gram names a variable, fits it, exists for every model, and is finite."""
  for i, g in enumerate(grams):
    if not isinstance(g, Mapping):
      raise ValueError(f"{where}: grams[{i}] must be a dict from kernel path to Gram, got {type(g).__name__}")
    for path in g:
      if not isinstance(path, tuple) or path not in leaves:
        raise ValueError(f"{where}: grams[{i}] has a Gram for {path!r}, which is not the path tuple of a"
                         " variable of the models")
    for path in sorted(set(g) ^ set(grams[0])):
      holder, other = (i, 0) if path in g else (0, i)
      raise ValueError(f"{where}: {tree.path_str(path)} has a Gram in grams[{holder}] but not in grams[{other}]")
    for path, gram in g.items():
      kernel_shape, shape = tuple(np.shape(leaves[path])), tuple(np.shape(gram))
      sizes = _input_sizes(kernel_shape)
      if len(shape) != 2 or shape[0] != shape[1] or shape[0] not in sizes:
        raise ValueError(f"{where}: grams[{i}][{tree.path_str(path)}] has shape {shape}; the kernel"
                         f" {kernel_shape} takes a (d, d) Gram over its leading axes, d in {sorted(set(sizes))}")
      if shape != np.shape(grams[0][path]):
        raise ValueError(f"{where}: {tree.path_str(path)}: Gram {shape} in grams[{i}] but"
                         f" {np.shape(grams[0][path])} in grams[0]")
  for i, g in enumerate(grams):
    tree.check_finite({tree.path_str(p): x for p, x in g.items()}, f"{where}: grams[{i}]")


def _shrink(gram: jax.Array, alpha: jax.typing.ArrayLike) -> jax.Array:
  """alpha G + (1 - alpha) diag(G): the off-diagonal entries scaled by alpha.

  Args:
    gram: f32[..., d, d].
    alpha: in [0, 1].

  Returns:
    f32[..., d, d].
  """
  diagonal = jnp.diagonal(gram, axis1=-2, axis2=-1)
  return alpha * gram + (1.0 - alpha) * diagonal[..., None] * jnp.eye(gram.shape[-1], dtype=gram.dtype)


@jax.jit
def _solve(grams: Sequence[jax.Array], kernels: Sequence[jax.Array], alpha: jax.Array):
  """One kernel's RegMean solution, and whether the Cholesky factorisation held.

  Args:
    grams: N x f32[d, d].
    kernels: N kernels of one shape, each read as `kernel.reshape(d, -1)`.
    alpha: the shrinkage.

  Returns:
    The merged kernel (the kernels' shape and dtype) and bool[]. Input
    features no model ever sees (a zero diagonal in every Gram, like a dead
    ReLU unit) keep the average kernel's row. When the Cholesky factorisation
    fails, the solution is `mean + pinv(S) (B - S mean)` from an
    eigendecomposition of S = sum_i G~_i (B = sum_i G~_i W_i): exact on S's
    range, the average on its null space.
  """
  solution, factored = _solve_columns(*_stacked(grams, kernels), alpha)
  return solution.reshape(kernels[0].shape).astype(kernels[0].dtype), factored


def _stacked(grams: Sequence[jax.Array], kernels: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(f32[N, d, d], f32[N, d, m]): the Grams and the kernels as matrices, stacked."""
  d = grams[0].shape[0]
  return (jnp.stack([jnp.asarray(x, jnp.float32) for x in grams]),
          jnp.stack([jnp.asarray(k, jnp.float32).reshape(d, -1) for k in kernels]))


def _solve_columns(g: jax.Array, w: jax.Array, alpha: jax.Array, axis_name: Any = None):
  """`_solve` on stacked Grams g: f32[N, d, d] and kernels w: f32[N, d, m].

  Every column of the solution depends on its column of w only, so under
  `shard_map` w may be split by columns over `axis_name` (g replicated):
  then only whether every shard factored is reduced.

  Returns:
    (f32[d, m], bool[]).
  """
  d = g.shape[1]
  shrunk = _shrink(g, alpha)
  lhs = jnp.sum(shrunk, 0)
  lhs = (lhs + lhs.T) / 2
  rhs = jnp.einsum("nde,nek->dk", shrunk, w, precision=HIGHEST)
  mean = jnp.mean(w, 0)
  unseen = jnp.diagonal(lhs) == 0
  lhs = jnp.where(unseen[:, None] | unseen[None, :], jnp.eye(d, dtype=lhs.dtype), lhs)
  rhs = jnp.where(unseen[:, None], mean, rhs)
  with jax.default_matmul_precision("highest"):
    solution = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(lhs, lower=True), rhs)
  factored = jnp.all(jnp.isfinite(solution))
  if axis_name is not None:
    factored = jax.lax.pmin(factored.astype(jnp.int32), axis_name).astype(bool)

  def pseudo_inverse():
    values, vectors = jnp.linalg.eigh(lhs)
    cutoff = d * jnp.finfo(jnp.float32).eps * jnp.max(jnp.abs(values))
    inverse = jnp.where(jnp.abs(values) > cutoff, 1.0 / jnp.where(values == 0, 1.0, values), 0.0)
    residual = rhs - jnp.matmul(lhs, mean, precision=HIGHEST)
    projected = jnp.matmul(vectors.T, residual, precision=HIGHEST)
    return mean + jnp.matmul(vectors, inverse[:, None] * projected, precision=HIGHEST)

  return jax.lax.cond(factored, lambda: solution, pseudo_inverse), factored


def _column_axes(kernel: Any, d: int) -> tuple[str, ...] | None:
  """The mesh axes a `NamedSharding` kernel is split over, when its `reshape(d, -1)`
  columns divide evenly among them; None for a kernel that is not sharded or
  whose columns do not divide (solved by `_solve`)."""
  sharding = getattr(kernel, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  axes = tuple(a for entry in sharding.spec if entry is not None
               for a in (entry if isinstance(entry, tuple) else (entry,)) if sharding.mesh.shape[a] > 1)
  shards = int(np.prod([sharding.mesh.shape[a] for a in axes]))
  return axes if axes and (kernel.size // d) % shards == 0 else None


@functools.lru_cache(maxsize=64)
def _sharded_solve(sharding: jax.sharding.NamedSharding, axes: tuple[str, ...]) -> Callable[..., Any]:
  """`_solve` for kernels laid out by `sharding`: the kernels are moved to a
  column layout over `axes` (an all-to-all where they are split by rows),
  each device solves its columns with the replicated Grams, and the result
  goes back to `sharding`; no kernel is gathered whole."""
  spec = jax.sharding.PartitionSpec
  columns = jax.sharding.NamedSharding(sharding.mesh, spec(None, None, axes))
  local = jax.shard_map(lambda g, w, alpha: _solve_columns(g, w, alpha, axes), mesh=sharding.mesh,
                        in_specs=(spec(), spec(None, None, axes), spec()), out_specs=(spec(None, axes), spec()))

  @jax.jit
  def solve(grams, kernels, alpha):
    g, w = _stacked(grams, kernels)
    solution, factored = local(g, jax.lax.with_sharding_constraint(w, columns), alpha)
    solution = solution.reshape(kernels[0].shape).astype(kernels[0].dtype)
    return jax.lax.with_sharding_constraint(solution, sharding), factored

  return solve


def _solve_kernels(leaves: Sequence[Mapping[Path, Any]], grams: Sequence[Mapping[Path, jax.Array]],
                   alpha: float, paths: Sequence[Path]) -> dict[Path, jax.Array]:
  """The RegMean kernels at `paths`; warns naming any solved by the eigendecomposition."""
  solved, factored = {}, {}
  for path in paths:
    kernels = tuple(l[path] for l in leaves)
    axes = _column_axes(kernels[0], grams[0][path].shape[0])
    path_grams = tuple(g[path] for g in grams)
    if axes is None:
      solved[path], factored[path] = _solve(path_grams, kernels, jnp.float32(alpha))
    else:  # the Grams replicated over the kernels' mesh (every process passes the same)
      path_grams = distributed.replicate(path_grams, kernels[0].sharding.mesh)
      solved[path], factored[path] = _sharded_solve(kernels[0].sharding, axes)(path_grams, kernels,
                                                                               jnp.float32(alpha))
  failed = [tree.path_str(p) for p, ok in jax.device_get(factored).items() if not ok]
  if failed:
    warnings.warn(f"regmean: the Cholesky factorisation failed for {', '.join(failed)} (Grams not positive"
                  " definite); solved by eigendecomposition, the average on the null space",
                  RuntimeWarning, stacklevel=3)
  return solved


def regmean(models: Sequence[PyTree], grams: Sequence[Mapping[Path, jax.Array]], *,
            alpha: float = 0.9) -> PyTree:
  """Merges models by RegMean: each kernel solves the regression on its inputs.

  For every kernel with a Gram,

      W* = (sum_i G~_i)^{-1} sum_i G~_i W_i,   G~ = alpha G + (1 - alpha) diag(G),

  with W_i the kernel of model i as `kernel.reshape(d, -1)` (d the Gram's
  size), solved in float32 at HIGHEST precision by a Cholesky factorisation
  (one compilation per kernel shape); an input feature no Gram sees keeps
  the average row, and a Gram sum that is not positive definite is solved by
  eigendecomposition with a warning. Every other leaf is the average.

  Args:
    models: N variable trees of one structure and shapes.
    grams: N dicts `{kernel path: f32[d, d]}` (`regmean_grams`), with the
      same paths; d is the product of the kernel's leading axes.
    alpha: in [0, 1], how much of the Grams' off-diagonal to keep.

  Returns:
    The merged variables, leaves in the models' dtypes.

  Raises:
    ValueError: before any solve, for models of different structure or
      shapes (the path named), non-finite weights or Grams, a number of Gram
      dicts other than of models, a Gram for no variable, of a shape that
      does not fit its kernel, or missing for some model (the path named),
      and alpha outside [0, 1].
  """
  models, grams = list(models), list(grams)
  _check_models(models, "regmean")
  _check_alpha(alpha, "regmean")
  if len(grams) != len(models):
    raise ValueError(f"regmean: {len(models)} models but {len(grams)} Gram dicts")
  leaves = [tree.leaves_by_path(m) for m in models]
  _check_grams(grams, leaves[0], "regmean")
  average = tree.weighted_sum(models, [1.0 / len(models)] * len(models))
  paths = [p for p in leaves[0] if p in grams[0]]
  return tree.replace_leaves(average, _solve_kernels(leaves, grams, alpha, paths))


def _input_order(kernel: kernels_lib.Kernel) -> np.ndarray:
  """int[d]: for each feature in the kernel's axis order, its index in design-row order."""
  in_axes = kernel.plan.in_axes
  index = np.arange(int(np.prod([kernel.shape[a] for a in in_axes], dtype=np.int64)))
  return index.reshape([kernel.shape[a] for a in in_axes]).transpose(np.argsort(in_axes)).reshape(-1)


def _regmean_kernels(apply_fn, variables, example, where: str) -> list[kernels_lib.Kernel]:
  """The kernels whose inputs are their leading axes; warns naming the others (averaged)."""
  kernels, others = [], []
  for k in kernels_lib.model_kernels(apply_fn, variables, example):
    leading = sorted(k.plan.in_axes) == list(range(len(k.plan.in_axes)))
    (kernels if leading else others).append(k)
  if others:
    warnings.warn(f"{where}: {', '.join(tree.path_str(k.path) for k in others)} read their input on other than"
                  " their leading axes (like `x @ w.T`); they have no Gram and are averaged", stacklevel=3)
  if not kernels:
    raise ValueError(f"{where}: apply_fn uses no linear kernel (dot_general or convolution with a variable)")
  return kernels


def _grams(apply_fn, kernels: Sequence[kernels_lib.Kernel], variables: PyTree, batches: Batches,
           mesh: jax.sharding.Mesh | None) -> dict[Path, jax.Array]:
  """One streamed pass: each kernel's Gram over rows, in the kernel's axis order."""
  found = stats.accumulate(stats.gram(kernels_lib.design_row_fn(apply_fn, kernels)), (variables,), batches,
                           mesh=mesh)
  out = {}
  for k, g in zip(kernels, found):
    order = _input_order(k)
    out[k.path] = (g.gram / jnp.maximum(g.count, 1.0))[np.ix_(order, order)]
  return out


def regmean_grams(apply_fn: Callable[..., Any], variables: PyTree, batches: Batches, *,
                  mesh: jax.sharding.Mesh | None = None) -> dict[Path, jax.Array]:
  """Each linear kernel's input Gram over data, for `regmean`.

  The kernels are the variables `apply_fn` contracts with its data in a
  `dot_general` or a convolution (`trace.kernel_uses`). A kernel's Gram is
  `X^T X / rows`: X holds one row per example and position (a Dense layer
  applied to tokens gives one row per token, a convolution one patch per
  output pixel), so the Gram is the inputs' second moment, and the models'
  Grams weigh alike whatever their data sizes. A kernel used several times
  (shared weights) has its uses' rows stacked. One streamed pass, sharded
  over `mesh` (`stats.accumulate`).

  Args:
    apply_fn: `apply_fn(variables, x)`.
    variables: one model's variables.
    batches: that model's inputs (DESIGN.md, batches).
    mesh: a 1-D mesh with axis "data"; default every device of every process (`distributed.default_mesh()`).

  Returns:
    `{kernel path: f32[d, d]}`, features ordered like the kernel's leading
    axes flattened (a Flax convolution's patches as `(kh, kw, c_in)`).
    Kernels that read their input on other than their leading axes (like
    `x @ w.T`) are left out, with a warning naming them.

  Raises:
    ValueError: for non-finite variables, empty batches, or a function with
      no linear kernel.
  """
  tree.check_finite(variables, "regmean_grams: variables")
  example, batches = distributed.peek_any_process(mesh, kernels_lib.peek, batches, "regmean_grams")
  kernels = _regmean_kernels(apply_fn, variables, example, "regmean_grams")
  logging.info("regmean_grams: %d kernels, %.1f MiB of Grams", len(kernels),
               kernels_lib.gram_bytes(kernels, models=1) / 2**20)
  return _grams(apply_fn, kernels, variables, batches, mesh)


def _steps(kernels: Sequence[kernels_lib.Kernel], blocks: Callable[[Path], Hashable] | None
           ) -> list[list[kernels_lib.Kernel]]:
  """Kernels grouped by block, blocks in the order of their first kernel."""
  steps: dict[Hashable, list[kernels_lib.Kernel]] = {}
  for k in kernels:
    steps.setdefault(k.path if blocks is None else blocks(k.path), []).append(k)
  return list(steps.values())


def _per_model_batches(batches: Sequence[Batches], n: int,
                       mesh: jax.sharding.Mesh | None) -> tuple[Any, list[Callable[[], Iterable[Any]]]]:
  """The first input, and a replayable batches per model (on a global mesh a
  process may have none: `distributed.peek_any_process`)."""
  if isinstance(batches, (np.ndarray, jax.Array)) or not isinstance(batches, Sequence) or len(batches) != n:
    raise ValueError(f"regmean_plus_plus: batches must hold one batches per model ({n}), e.g. [data_a, data_b]")
  examples, replayable = [], []
  for i, b in enumerate(batches):
    if isinstance(b, (np.ndarray, jax.Array)):
      raise ValueError(f"regmean_plus_plus: batches[{i}] is an array; give each model an iterable of"
                       " batches (a single batch in a list)")
    example, b = distributed.peek_any_process(mesh, kernels_lib.peek, b, f"regmean_plus_plus: batches[{i}]")
    examples.append(example)
    replayable.append(kernels_lib.replayable(b))
  return examples[0], replayable


def regmean_plus_plus(
    apply_fn: Callable[..., Any],
    models: Sequence[PyTree],
    batches: Sequence[Batches],
    *,
    alpha: float = 0.9,
    blocks: Callable[[Path], Hashable] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> PyTree:
  """Merges models by RegMean++: each layer's Grams come from the merged layers before it.

  RegMean computes the Grams of model i's layer l from model i's own
  activations; RegMean++ (Nguyen et al., arXiv 2508.03121) from the
  activations of the merged model's earlier layers, so each layer is fitted
  to the inputs it will see. Implemented here, in the order of the kernels'
  first use in the trace (`blocks` groups them into steps; default one step
  per kernel):

  1. merged = the average of the models.
  2. For each step s, for each model i: the hybrid model takes the merged
     value of every kernel of an earlier step, model i's own value of every
     kernel of step s and later, and the average of every other leaf, except
     that a leaf whose `blocks(path)` names a step's block is model i's own
     until that step is merged. The Grams of step s's kernels are computed
     from the hybrid on `batches[i]` (one pass, as `regmean_grams`).
  3. Step s's kernels are solved as in `regmean` and written into merged.

  With `blocks=None`, a kernel's inputs are therefore exactly the merged
  model's inputs to it on model i's data (the later kernels do not reach
  them), and models given the same data have the same Grams, so the merge
  is the average: give each model its own data, as RegMean intends. The
  paper's transformer recipe is `blocks=lambda path: path[:2]` (e.g.
  `("params", "encoderblock_3")`): a block's kernels, norms and biases are
  model i's own while its Grams are computed, from the merged output of the
  blocks before it. That costs one pass per step and model.

  Args:
    apply_fn: `apply_fn(variables, x)`.
    models: N variable trees of one structure and shapes.
    batches: one batches (DESIGN.md, batches) per model, each read once per
      step.
    alpha: in [0, 1], the Grams' shrinkage as in `regmean`.
    blocks: `kernel or leaf path -> block key`, kernels of one key merged in
      one step; default every kernel its own step.
    mesh: a 1-D mesh with axis "data"; default every device of every process (`distributed.default_mesh()`).

  Returns:
    The merged variables.

  Raises:
    ValueError: before any pass over data, for models of different
      structure or shapes (the path named), non-finite weights, batches not
      one per model or empty, alpha outside [0, 1], a function with no linear
      kernel; after a pass, for non-finite Grams (the layer named).
  """
  models = list(models)
  _check_models(models, "regmean_plus_plus")
  _check_alpha(alpha, "regmean_plus_plus")
  example, batches = _per_model_batches(batches, len(models), mesh)
  kernels = _regmean_kernels(apply_fn, models[0], example, "regmean_plus_plus")
  steps = _steps(kernels, blocks)
  leaves = [tree.leaves_by_path(m) for m in models]
  step_of = {k.path: s for s, step in enumerate(steps) for k in step}
  if blocks is not None:
    block_step = {blocks(step[0].path): s for s, step in enumerate(steps)}
    for path in leaves[0]:
      if path not in step_of and blocks(path) in block_step:
        step_of[path] = block_step[blocks(path)]
  merged = tree.weighted_sum(models, [1.0 / len(models)] * len(models))
  for s, step in enumerate(steps):
    start = time.perf_counter()
    grams = []
    for i, (own, data) in enumerate(zip(leaves, batches)):
      hybrid = tree.replace_leaves(merged, {p: own[p] for p, t in step_of.items() if t >= s})
      grams.append(_grams(apply_fn, step, hybrid, data, mesh))
      tree.check_finite({tree.path_str(p): g for p, g in grams[-1].items()},
                        f"regmean_plus_plus: the Grams of model {i}")
    merged = tree.replace_leaves(merged, _solve_kernels(leaves, grams, alpha, [k.path for k in step]))
    logging.info("regmean_plus_plus: step %d/%d merged %s in %.1f s", s + 1, len(steps),
                 ", ".join(tree.path_str(k.path) for k in step), time.perf_counter() - start)
  return merged
