"""TALL masks and Consensus merging over models that share a base.

Wang, Dimitriadis, Ortiz-Jimenez, Fleuret and Frossard, "Localizing Task
Information for Improved Model Merging and Compression" (arXiv 2405.07813),
its TALL-mask construction and Consensus Merging. With task vectors tau_t = models[t] - base and a
multi-task vector tau_MTL (task arithmetic's sum_t tau_t, the paper's
default, or TIES's merged vector, both at scale 1):

- TALL mask of task t: m_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|, entry
  by entry: the entries where tau_MTL is closer to the task's own model than
  the base is (up to lambda_t).
- Compression: base + m_t * tau_MTL reconstructs task t's model from the
  shared tau_MTL and one mask (`tall_reconstruct`).
- Consensus merging: keep the entries of tau_MTL that at least k masks
  select (k = 2 drops the "selfish" weights one task alone uses and the
  "catastrophic" ones no task does): base + scale * (m_consensus * tau_MTL),
  `consensus_task_arithmetic` and `consensus_ties`.

    masks = mj.merge.tall_masks(base, models, lambdas=0.4)
    tau = mj.merge.multitask_vector(base, models)
    model_0 = mj.merge.tall_reconstruct(base, tau, masks[0])
    merged = mj.merge.consensus_task_arithmetic(base, models, k=2, scale=0.3)
    merged = mj.merge.consensus_ties(base, models, k=2, density=0.2)

The paper picks lambda_t per task from {0.2, 0.3, 0.4, 0.5, 0.6} on held-out
data; the default 0.4 is the middle of that grid. Where the authors' code
(`nik-dim/tall_masks`) differs: it tests |tau_t| > lambda_t |tau_MTL - tau_t|
strictly (the paper's equation, used here, has >=; they differ only on
ties, such as entries where both sides are 0), and its TIES vector sums the
agreeing values (`aggregate="sum"`) where TIES's own definition, the default
here, averages them, trims globally (`trim="global"`), keeps int(d n) + 1
entries and elects the model's majority sign where a sum is 0 (FusionBench's
rules, `convention="fusion_bench"` of `ties`, not offered here).

Task vectors are float32 (or wider); merged and reconstructed leaves keep the
base's dtype. Every function checks its arguments before any work and maps
one jit-compiled function over the leaves, so all of them work one leaf at a
time (out of core), the global TIES trim given its `thresholds` from
`mj.merge.ties_thresholds`.

Masks are pytrees of booleans shaped like the model: one byte per entry in
memory, so T masks take T / 4 times a float32 model; `pack_mask` stores one
as bits (np.packbits, 1 / 32 of a float32 model) and `unpack_mask` restores
it.
"""

from collections.abc import Sequence
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import tree
from mergejax.merge import task_vectors as tv

PyTree = Any

MULTITASK = ("task_arithmetic", "ties")


def _check_lambdas(lambdas: float | Sequence[float], num: int) -> np.ndarray:
  """f32[N]: lambda_t per task, from one float or N floats, all finite and >= 0."""
  return tv._per_model_values(lambdas, num, "lambdas", "lambdas", nonnegative=True)


def _check_k(k: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f"k must be an int >= 0, got {k!r}")
  return int(k)


class _Multitask(NamedTuple):
  """How tau_MTL is built (a static argument of the leaf functions).

  Attributes:
    kind: "task_arithmetic" or "ties".
    per_tensor: with "ties", whether the trim is per leaf.
    aggregate: with "ties", the disjoint merge's "mean" or "sum".
  """

  kind: str
  per_tensor: bool = True
  aggregate: str = "mean"


def _check_multitask(
    multitask: str,
    density: float,
    trim: str,
    thresholds: Sequence[float] | None,
    aggregate: str,
    num: int,
) -> _Multitask:
  if multitask not in MULTITASK:
    raise ValueError(f"multitask must be one of {MULTITASK}, got {multitask!r}")
  if multitask == "task_arithmetic":
    if thresholds is not None:
      raise ValueError("thresholds are TIES's global trim's; pass multitask='ties', trim='global'")
    return _Multitask(multitask)
  tv._check_density(density)
  tv._check_trim(trim, thresholds, num)
  return _Multitask(multitask, trim == "tensor", tv._check_aggregate(aggregate))


def _leaf_multitask(b, xs, how: _Multitask, trim_at):
  """(taus f32[N, *b.shape], tau_MTL f32[*b.shape]) at one leaf.

  trim_at: with TIES, the trim's k of this leaf (per tensor) or the models'
  thresholds f32[N].
  """
  taus = tv._leaf_task_vectors(b, xs, None, 1.0)
  if how.kind == "task_arithmetic":
    return taus, jnp.sum(taus, axis=0)
  trimmed = tv._leaf_trimmed(b, xs, None, trim_at, 1.0, "inverse_keep", how.per_tensor)
  return taus, tv._disjoint_merge(trimmed, aggregate=how.aggregate)


def _tall_leaf(b, xs, how: _Multitask, trim_at, lambdas):
  """(tau_MTL, masks bool[N, *b.shape]) at one leaf; lambdas: f32[N]."""
  taus, multitask = _leaf_multitask(b, xs, how, trim_at)
  masks = jnp.abs(taus) >= tv._per_model(lambdas, b.ndim) * jnp.abs(multitask - taus)
  return multitask, masks


_tall_leaf_jit = jax.jit(_tall_leaf, static_argnums=2)


@functools.partial(jax.jit, static_argnums=2)
def _consensus_leaf(b, xs, how, trim_at, lambdas, k, scale):
  """b + scale * tau_MTL where at least k TALL masks select the entry."""
  multitask, masks = _tall_leaf(b, xs, how, trim_at, lambdas)
  kept = jnp.sum(masks, axis=0) >= k
  return tv._rebase(b, scale * jnp.where(kept, multitask, 0))


def _map_tall(
    leaf_fn,
    base: PyTree,
    models: list[PyTree],
    how: _Multitask,
    density: float,
    thresholds: Sequence[float] | None,
) -> PyTree:
  """`leaf_fn(b, xs, how, trim_at)` for each leaf, in the base's structure.

  The global TIES trim's thresholds are computed first when not given.
  """
  trim_at = lambda b: None
  if how.kind == "ties":
    trim = "tensor" if how.per_tensor else "global"
    trim_at = tv._trim_points(
        base, models, density, trim, thresholds, None, 1.0, tv.CONVENTIONS["mergejax"])
  return tv._map_leaves(lambda b, xs, _: leaf_fn(b, xs, how, trim_at(b)), base, models, None)


def multitask_vector(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    multitask: str = "task_arithmetic",
    density: float = 0.2,
    trim: str = "tensor",
    thresholds: Sequence[float] | None = None,
    aggregate: str = "mean",
) -> PyTree:
  """tau_MTL, the multi-task vector that TALL masks compare with and select from.

  Args:
    base: the pre-trained model.
    models: T >= 1 models fine-tuned from it (same structure and shapes).
    multitask: "task_arithmetic" (sum_t tau_t, the paper's default) or
      "ties" (`ties`'s merged task vector at scale 1).
    density: with "ties", the fraction of each task vector kept, in (0, 1].
    trim: with "ties", "tensor" or "global" (see `ties`).
    thresholds: with "ties" and `trim="global"`, each model's threshold
      (`ties_thresholds`); None: computed.
    aggregate: with "ties", its disjoint merge's "mean" (TIES's) or "sum".

  Returns:
    tau_MTL, leaves in float32 (or the base's dtype where wider).

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), an unknown multitask, or bad TIES arguments (see `ties`).
  """
  models = tv._check_models(base, models)
  how = _check_multitask(multitask, density, trim, thresholds, aggregate, len(models))
  no_lambdas = jnp.zeros(len(models), jnp.float32)
  return _map_tall(
      lambda b, xs, how, trim_at: _tall_leaf_jit(b, xs, how, trim_at, no_lambdas)[0],
      base, models, how, density, thresholds,
  )


def tall_masks(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    lambdas: float | Sequence[float] = 0.4,
    multitask: str = "task_arithmetic",
    density: float = 0.2,
    trim: str = "tensor",
    thresholds: Sequence[float] | None = None,
    aggregate: str = "mean",
) -> list[PyTree]:
  """TALL masks (arXiv 2405.07813): m_t = |tau_t| >= lambda_t |tau_MTL - tau_t|.

  Args:
    base: the pre-trained model.
    models: T >= 1 models fine-tuned from it (same structure and shapes).
    lambdas: lambda_t, one float >= 0 for every task or T floats; a larger
      lambda_t selects fewer entries (0 selects all).
    multitask, density, trim, thresholds, aggregate: how tau_MTL is built
      (see `multitask_vector`).

  Returns:
    T pytrees of booleans shaped like the base, mask t for models[t].

  Raises:
    ValueError: as `multitask_vector`, or a wrong number of lambdas or a
      negative or non-finite one.
  """
  models = tv._check_models(base, models)
  lambdas = jnp.asarray(_check_lambdas(lambdas, len(models)))
  how = _check_multitask(multitask, density, trim, thresholds, aggregate, len(models))
  stacked = _map_tall(
      lambda b, xs, how, trim_at: _tall_leaf_jit(b, xs, how, trim_at, lambdas)[1],
      base, models, how, density, thresholds,
  )
  return [jax.tree.map(lambda m, t=t: m[t], stacked) for t in range(len(models))]


def _check_masks(masks: Sequence[PyTree], like: PyTree | None = None) -> list[PyTree]:
  """The masks as a list, after checking their shapes (against `like`) and dtypes."""
  masks = list(masks)
  if not masks:
    raise ValueError("masks: need at least one mask")
  trees = masks if like is None else [like, *masks]
  try:
    tree.check_same_shapes(*trees)
  except ValueError as e:
    raise ValueError(f"masks do not match{'' if like is None else ' the base'}: {e}") from None
  for i, mask in enumerate(masks):
    for path, leaf in tree.leaves_with_paths(mask):
      if jnp.result_type(leaf) != jnp.bool_:
        raise ValueError(f"masks[{i}]: {path} has dtype {jnp.result_type(leaf)}; masks are boolean")
  return masks


@jax.jit
def _count_at_least(ms: list[jax.Array], k: int) -> jax.Array:
  """Where at least k of one leaf's masks are True."""
  return sum(m.astype(jnp.int32) for m in ms) >= k


def consensus_mask(masks: Sequence[PyTree], *, k: int = 2) -> PyTree:
  """m_consensus: the entries at least k of the masks select (arXiv 2405.07813).

  Args:
    masks: T >= 1 boolean pytrees of one structure and shapes (`tall_masks`).
    k: the least number of masks that must select an entry; 0 keeps every
      entry, more than T none.

  Returns:
    A boolean pytree like the masks.

  Raises:
    ValueError: no mask, masks of different shapes (naming the leaf path) or
      not boolean, or k not an int >= 0.
  """
  masks = _check_masks(masks)
  k = _check_k(k)
  return jax.tree.map(lambda *ms: _count_at_least(list(ms), k), *masks)


@jax.jit
def _reconstruct_leaf(b: jax.Array, tau: jax.Array, m: jax.Array) -> jax.Array:
  """b + m * tau at one leaf, in b's dtype."""
  return tv._rebase(b, jnp.where(m, tau.astype(jnp.promote_types(tau.dtype, jnp.float32)), 0))


def tall_reconstruct(base: PyTree, multitask: PyTree, mask: PyTree) -> PyTree:
  """Task t's model from the compressed form: base + m_t * tau_MTL (arXiv 2405.07813).

  With one task (tau_MTL = tau_1) the mask selects every entry and the model
  comes back as `task_arithmetic(base, [model])` does.

  Args:
    base: the pre-trained model.
    multitask: tau_MTL (`multitask_vector`), shaped like the base.
    mask: m_t, a boolean pytree shaped like the base (`tall_masks`).

  Returns:
    The reconstructed model, in the base's leaf dtypes.

  Raises:
    ValueError: a multitask vector or mask that does not match the base
      (naming the leaf path), or a mask that is not boolean.
  """
  try:
    tree.check_same_shapes(base, multitask)
  except ValueError as e:
    raise ValueError(f"multitask does not match the base: {e}") from None
  _check_masks([mask], base)
  return jax.tree.map(_reconstruct_leaf, base, multitask, mask)


def _consensus(
    base: PyTree,
    models: Sequence[PyTree],
    k: int,
    lambdas: float | Sequence[float],
    scale: float,
    multitask: str,
    density: float,
    trim: str,
    thresholds: Sequence[float] | None,
    aggregate: str,
) -> PyTree:
  """Checks the arguments, then base + scale * (m_consensus * tau_MTL)."""
  models = tv._check_models(base, models)
  k = _check_k(k)
  lambdas = jnp.asarray(_check_lambdas(lambdas, len(models)))
  scale = tv._check_scale(scale)
  how = _check_multitask(multitask, density, trim, thresholds, aggregate, len(models))
  return _map_tall(
      lambda b, xs, how, trim_at: _consensus_leaf(b, xs, how, trim_at, lambdas, k, scale),
      base, models, how, density, thresholds,
  )


def consensus_task_arithmetic(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    k: int = 2,
    lambdas: float | Sequence[float] = 0.4,
    scale: float = 1.0,
) -> PyTree:
  """Consensus task arithmetic (Consensus Merging of arXiv 2405.07813).

  base + scale * (m_consensus * sum_t tau_t), where m_consensus keeps the
  entries that at least k of the TALL masks (built with tau_MTL =
  sum_t tau_t) select. k = 0 is `task_arithmetic` at `scale`; k > T is the
  base.

  Args:
    base: the pre-trained model.
    models: T >= 1 models fine-tuned from it (same structure and shapes).
    k: the least number of tasks that must select an entry (the paper's
      default, 2).
    lambdas: the TALL masks' lambda_t (see `tall_masks`).
    scale: the factor on the masked multi-task vector.

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), k not an int >= 0, bad lambdas, or a non-finite scale.
  """
  return _consensus(base, models, k, lambdas, scale, "task_arithmetic", 1.0, "tensor", None, "mean")


def consensus_ties(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    k: int = 2,
    lambdas: float | Sequence[float] = 0.4,
    density: float = 0.2,
    scale: float = 1.0,
    trim: str = "tensor",
    thresholds: Sequence[float] | None = None,
    aggregate: str = "mean",
) -> PyTree:
  """Consensus TIES (Consensus Merging of arXiv 2405.07813).

  base + scale * (m_consensus * tau_TIES), where tau_TIES is `ties`'s merged
  task vector at scale 1 and m_consensus keeps the entries that at least k
  of the TALL masks (built with tau_MTL = tau_TIES) select. k = 0 is `ties`.

  Args:
    base: the pre-trained model.
    models: T >= 1 models fine-tuned from it (same structure and shapes).
    k: the least number of tasks that must select an entry.
    lambdas: the TALL masks' lambda_t (see `tall_masks`).
    density: TIES's fraction of each task vector kept, in (0, 1].
    scale: the factor on the masked multi-task vector.
    trim: TIES's trim, "tensor" or "global".
    thresholds: with `trim="global"`, each model's threshold
      (`ties_thresholds`); None: computed.
    aggregate: TIES's disjoint "mean" or "sum" (the authors' code's).

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: as `consensus_task_arithmetic`, or bad TIES arguments (see
      `ties`).
  """
  return _consensus(base, models, k, lambdas, scale, "ties", density, trim, thresholds, aggregate)


def pack_mask(mask: PyTree) -> PyTree:
  """A boolean mask stored as bits: each leaf np.packbits of its flattened entries.

  Returns:
    A pytree of uint8[ceil(size / 8)] NumPy arrays, in the mask's structure.

  Raises:
    ValueError: a leaf that is not boolean (naming its path).
  """
  _check_masks([mask])
  return jax.tree.map(lambda m: np.packbits(np.asarray(m).ravel()), mask)


def unpack_mask(packed: PyTree, like: PyTree) -> PyTree:
  """The boolean mask `pack_mask` stored, with the leaf shapes of `like`.

  Args:
    packed: `pack_mask`'s output.
    like: a pytree of the mask's structure and shapes (the base model).

  Returns:
    A pytree of boolean NumPy arrays shaped like `like`.

  Raises:
    ValueError: a structure that differs from `like`'s, or a leaf with the
      wrong number of bytes for its shape (naming its path).
  """
  try:
    tree.check_same_structure(like, packed)
  except ValueError as e:
    raise ValueError(f"packed does not match like: {e}") from None

  def leaf(path, p, x):
    size = math.prod(np.shape(x))
    if np.shape(p) != (-(-size // 8),):
      raise ValueError(f"packed: {tree.path_str(path)} has shape {np.shape(p)}, not ({-(-size // 8)},)")
    return np.unpackbits(np.asarray(p, np.uint8), count=size).astype(bool).reshape(np.shape(x))

  return jax.tree_util.tree_map_with_path(leaf, packed, like)
