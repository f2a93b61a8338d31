"""LiNeS: task vectors scaled linearly with depth.

Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret and Frossard, "LiNeS:
Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging"
(arXiv 2410.17146). The task vector of block l of L (a residual
block or stage, not a single kernel) is scaled by

    lambda(l) = alpha + beta * l / (L - 1),    l = 0, ..., L - 1

(the paper numbers blocks 1..L and writes (l - 1) / (L - 1)), so shallow
blocks, which hold general features, stay close to the base and deep ones
keep more of the task. With L = 1 every block is scaled by alpha.

    blocks = mj.merge.blocks_in_read_order(apply_fn, variables, x)
    merged = mj.merge.lines(base, models, blocks=blocks, beta=0.5)
    merged = mj.merge.lines(base, models, blocks=blocks, beta=0.5,
                            merged=mj.merge.ties(base, models))
    edited = tree.add(base, mj.merge.scale_by_depth(
        mj.merge.task_vector(base, tuned), blocks=blocks, alpha=0.3, beta=0.7))

`scale_by_depth` scales any task vector (one model's, or a merged one), so it
composes with task arithmetic, TIES, Consensus and the rest; `lines` is the
paper's multi-task merge. `blocks` says which block each leaf belongs to: a
mapping from the leaf's path (`a/b/c`, as `mj.tree.path_str` writes it) to a
block index, or a callable from that path to the index. A leaf whose block is
None is outside every block and scaled by alpha, as the authors' code does
for the embeddings and final normalisation of a ViT.
"""

from collections.abc import Callable, Hashable, Mapping, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import trace
from mergejax import tree
from mergejax.merge import task_vectors as tv

PyTree = Any
Blocks = Mapping[str, int | None] | Callable[[str], int | None]


def depth_scales(num_blocks: int, alpha: float, beta: float) -> np.ndarray:
  """f64[L]: lambda(l) = alpha + beta * l / (L - 1) for blocks l = 0..L-1.

  LiNeS's scale of each block (arXiv 2410.17146); [alpha] when
  L = 1.

  Raises:
    ValueError: L < 1, or alpha or beta not finite.
  """
  if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
    raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
  alpha, beta = _finite("alpha", alpha), _finite("beta", beta)
  depth = np.arange(num_blocks, dtype=np.float64) / max(num_blocks - 1, 1)
  return alpha + beta * depth


def _finite(name: str, value: float) -> float:
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}")
  return float(value)


def _leaf_blocks(like: PyTree, blocks: Blocks) -> list[int | None]:
  """Each leaf's block index (None: outside the blocks), in flattening order.

  Raises:
    ValueError: a leaf the mapping does not name, a path the mapping names
      that is not a leaf, or an index that is not an int >= 0 or None.
  """
  paths = [path for path, _ in tree.leaves_with_paths(like)]
  if isinstance(blocks, Mapping):
    unknown = sorted(set(blocks) - set(paths))
    if unknown:
      raise ValueError(f"blocks: {unknown[0]} is not a leaf of the tree")
    missing = [p for p in paths if p not in blocks]
    if missing:
      raise ValueError(f"blocks: no block for leaf {missing[0]} (map it to None to scale it by alpha)")
    indices = [blocks[p] for p in paths]
  elif callable(blocks):
    indices = [blocks(p) for p in paths]
  else:
    raise ValueError(f"blocks must be a mapping or a callable, got {type(blocks).__name__}")
  for path, index in zip(paths, indices):
    if index is not None and (isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0):
      raise ValueError(f"blocks: {path} has block {index!r}; need an int >= 0 or None")
  return [None if i is None else int(i) for i in indices]


def _block_indices(
    like: PyTree, blocks: Blocks, num_blocks: int | None
) -> tuple[list[int | None], int]:
  """(each leaf's block index, L), after checking them against each other."""
  indices = _leaf_blocks(like, blocks)
  largest = max((i for i in indices if i is not None), default=0)
  if num_blocks is None:
    return indices, largest + 1
  if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
    raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
  if num_blocks <= largest:
    raise ValueError(f"num_blocks is {num_blocks} but a leaf is in block {largest}")
  return indices, num_blocks


def _leaf_scales(
    like: PyTree, indices: list[int | None], num_blocks: int, alpha: float, beta: float
) -> PyTree:
  """A tree like `like` holding each leaf's lambda(l) as a Python float."""
  scales = depth_scales(num_blocks, alpha, beta)
  flat = [float(alpha if i is None else scales[i]) for i in indices]
  return jax.tree.unflatten(jax.tree.structure(like), flat)


@jax.jit
def _scale_leaves(tau: PyTree, scales: PyTree) -> PyTree:
  """scales * tau leaf by leaf, in float32 (or wider), in tau's dtypes."""
  def leaf(x, s):
    dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)
    return (s * x.astype(dtype)).astype(jnp.result_type(x))

  return jax.tree.map(leaf, tau, scales)


def scale_by_depth(
    task_vector: PyTree,
    *,
    blocks: Blocks,
    alpha: float,
    beta: float,
    num_blocks: int | None = None,
) -> PyTree:
  """LiNeS's scaling of a task vector: block l's leaves times lambda(l).

  lambda(l) = alpha + beta * l / (L - 1) (`depth_scales`); leaves whose
  block is None are scaled by alpha. The paper's single-task edit is
  alpha = lambda, beta = 1 - lambda (the last block keeps its whole change);
  its multi-task merge is `lines`.

  Args:
    task_vector: any pytree of arrays (a model minus its base, or a merged
      task vector).
    blocks: leaf path (`a/b/c`) -> block index l >= 0 or None, as a mapping
      naming every leaf or a callable.
    alpha: the first block's scale.
    beta: the last block's scale minus the first's.
    num_blocks: L; None: one more than the largest index in `blocks`.

  Returns:
    The scaled task vector, each leaf in its own dtype (the products are taken
    in float32 or wider).

  Raises:
    ValueError: bad blocks (naming the leaf), num_blocks not above every
      index, or alpha or beta not finite.
  """
  _finite("alpha", alpha)
  _finite("beta", beta)
  indices, num_blocks = _block_indices(task_vector, blocks, num_blocks)
  return _scale_leaves(task_vector, _leaf_scales(task_vector, indices, num_blocks, alpha, beta))


@jax.jit
def _l1_norms(base: PyTree, models: list[PyTree], merged: PyTree) -> tuple[jax.Array, jax.Array]:
  """(||sum_t tau_t||_1, ||merged - base||_1), in float32 (or wider)."""
  summed = jax.tree.map(lambda b, *xs: jnp.sum(jnp.abs(sum(tv._delta(x, b) for x in xs))), base, *models)
  own = jax.tree.map(lambda b, m: jnp.sum(jnp.abs(tv._delta(m, b))), base, merged)
  return sum(jax.tree.leaves(summed)), sum(jax.tree.leaves(own))


def multitask_alpha(base: PyTree, models: Sequence[PyTree], merged: PyTree | None = None) -> float:
  """LiNeS's alpha for a multi-task merge: ||sum_t tau_t||_1 / (T ||tau_MTL||_1).

  tau_MTL = merged - base is the merged task vector that `lines` scales
  (sum_t tau_t when `merged` is None, and then alpha = 1 / T exactly). The
  normalisation is the authors' code's (`wang-kee/LiNeS`, src/eval/eval.py):
  it makes the first block's scale that of averaging the task vectors.

  Raises:
    ValueError: no model, models or `merged` not matching the base, or a
      `merged` equal to the base (no task vector to scale).
  """
  models = tv._check_models(base, models)
  if merged is not None:
    _check_merged(base, merged)
  return _multitask_alpha(base, models, merged)


def _multitask_alpha(base: PyTree, models: list[PyTree], merged: PyTree | None) -> float:
  """`multitask_alpha` of checked arguments."""
  if merged is None:
    return 1.0 / len(models)
  summed, own = (float(x) for x in jax.device_get(_l1_norms(base, models, merged)))
  if own == 0:
    raise ValueError("merged: equals the base, so alpha = ||sum tau|| / (T ||tau_MTL||) is undefined; pass alpha")
  return summed / (len(models) * own)


def _check_merged(base: PyTree, merged: PyTree) -> None:
  try:
    tree.check_same_shapes(base, merged)
  except ValueError as e:
    raise ValueError(f"merged does not match the base: {e}") from None


@jax.jit
def _lines_leaf(b: jax.Array, xs: list[jax.Array], scale: jax.Array) -> jax.Array:
  """b + scale * sum_i (xs[i] - b) at one leaf (task arithmetic at one scale)."""
  return tv._task_arithmetic_leaf(b, xs, None, jnp.full(len(xs), scale, jnp.float32), 1.0)


def lines(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    blocks: Blocks,
    beta: float,
    alpha: float | None = None,
    merged: PyTree | None = None,
    num_blocks: int | None = None,
) -> PyTree:
  """LiNeS multi-task merging: base + `scale_by_depth`(tau_MTL).

  tau_MTL is the merged task vector (the paper's multi-task setting): the sum of
  the task vectors sum_t (models[t] - base) by default (task arithmetic), or
  `merged - base` for a multi-task model merged by any method at scale 1
  (TIES, Consensus...). Block l of it is scaled by
  lambda(l) = alpha + beta * l / (L - 1); alpha defaults to
  `multitask_alpha` (1 / T for the sum: the first block gets the task
  vectors' average), beta is the swept hyper-parameter. alpha = 1 and
  beta = 0 is task arithmetic at scale 1.

  The merge is per leaf: out of core, compute alpha in a first pass (it
  needs two L1 norms over the whole model) and pass it.

  Args:
    base: the pre-trained model.
    models: T >= 1 models fine-tuned from it (same structure and shapes).
    blocks: leaf path (`a/b/c`) -> block index l >= 0 or None (scaled by
      alpha), a mapping naming every leaf or a callable
      (`blocks_in_read_order` derives one from the model).
    beta: the last block's scale minus the first's.
    alpha: the first block's scale; None: `multitask_alpha`.
    merged: the multi-task model whose task vector is scaled; None: the sum
      of the task vectors.
    num_blocks: L; None: one more than the largest index in `blocks`.

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model or `merged` that does not match the base
      (naming the leaf path), bad blocks (naming the leaf), num_blocks not
      above every index, alpha or beta not finite, or a `merged` equal to
      the base with alpha None.
  """
  models = tv._check_models(base, models)
  if merged is not None:
    _check_merged(base, merged)
  _finite("beta", beta)
  if alpha is not None:
    _finite("alpha", alpha)
  indices, num_blocks = _block_indices(base, blocks, num_blocks)
  if alpha is None:
    alpha = _multitask_alpha(base, models, merged)
  scales = _leaf_scales(base, indices, num_blocks, alpha, beta)
  sources = models if merged is None else [merged]
  return jax.tree.map(lambda b, s, *xs: _lines_leaf(b, list(xs), s), base, scales, *sources)


def blocks_in_read_order(
    apply_fn: Callable[..., Any],
    variables: PyTree,
    *example_args: Any,
    key: int | Callable[[tuple[str, ...]], Hashable | None] = 1,
) -> dict[str, int | None]:
  """Each leaf's block, the blocks numbered in the order the model reads them.

  The leaves are put in the order `apply_fn(variables, *example_args)` first
  reads them (`mj.trace.read_order`); leaves with the same block key form a
  block, and block l is the l-th key to be read. Leaves the function never
  reads get None (scaled by alpha).

  With the default key (the module right under the collection), a zoo
  ResNet-20's blocks are `stem_conv`, `stem_bn`, `stage0_block0`, ...,
  `stage2_block2`, `head`: the stem counts as the first blocks and the head
  as the last. To leave the stem and head at alpha, as the paper's ViTs do
  with their embeddings and final norm, give a key that returns None for
  them.

  Args:
    apply_fn: as for `mj.trace.permutation_spec` (bind `train=False`).
    variables: the whole variables tree (arrays or `jax.ShapeDtypeStruct`s).
    *example_args: example inputs; only their shapes matter.
    key: an int d: the leaf path's keys 1..d (the first is the collection,
      `params` or `batch_stats`, so BatchNorm statistics join their layer's
      block); or a callable from the path (a tuple of key names) to a block
      name, None for a leaf outside every block.

  Returns:
    `{path_str: block index or None}` for every leaf, ready for `blocks=`.

  Raises:
    ValueError: key an int below 1.
  """
  if not callable(key):
    if isinstance(key, bool) or not isinstance(key, int) or key < 1:
      raise ValueError(f"key must be an int >= 1 or a callable, got {key!r}")
    depth = key
    key = lambda path: path[1:1 + depth]
  indices: dict[Hashable, int] = {}
  read = {}
  for path in trace.read_order(apply_fn, variables, *example_args):
    name = key(path)
    if name is not None:
      read[path] = indices.setdefault(name, len(indices))
  return {tree.path_str(path): read.get(tree.key_path(path))
          for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
