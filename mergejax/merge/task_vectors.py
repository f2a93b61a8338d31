"""Task vectors: task arithmetic, TIES and DARE over models that share a base.

A fine-tuned model's task vector is `tau_i = models[i] - base`. The merges
add a combination of task vectors back onto the base:

    merged = mj.merge.task_arithmetic(base, [v1, v2], scale=0.3)
    merged = mj.merge.ties(base, [v1, v2], density=0.2)
    merged = mj.merge.dare(base, [v1, v2], drop=0.9, key=key)
    merged = mj.merge.dare_ties(base, [v1, v2], drop=0.9, density=0.2, key=key)

- Task arithmetic (Ilharco et al. 2023): `base + sum_i scale_i tau_i`.
- TIES (Yadav et al. 2023): trim each tau_i to its largest-magnitude entries,
  elect a sign per entry (the sign of the sum of the trimmed vectors), and
  average, entry by entry, the trimmed values of the models that agree with
  it (0 where none does): `base + scale * merged`.
- DARE (Yu et al. 2024): drop each entry of tau_i with probability `drop` and
  rescale the survivors by 1 / (1 - drop), then task arithmetic (`dare`) or
  TIES (`dare_ties`).

Task vectors are computed in float32 (or wider) and every merged leaf keeps
the base's dtype. Each function checks its arguments before any work and runs
as one jit-compiled function over the whole tree.

The parts an out-of-core merge needs are public, so that a merge that sees one
leaf at a time (a dict nested along the leaf's path) reproduces the in-memory
one exactly: `keep_count` (TIES's k), `ties_thresholds` (the global trim's
first pass, passed back as `thresholds=`), `ties_sign_balance` (FusionBench's
majority sign, passed back as `sign_balance=`) and `leaf_key` (DARE's random
key of one leaf).

Other tools' conventions. On the same tensors, FusionBench
(tanganke/fusion_bench, `ties_merging_utils.py`, `dare/`) and mergekit
(arcee-ai/mergekit, `sparsify.py`, `generalized_task_arithmetic.py`) compute
the same merges up to three rules, which `convention=` selects (a name of
`CONVENTIONS`, or a `Convention` of rules of your own):

| rule                  | "mergejax" (default) | "fusion_bench"     | "mergekit"         |
|-----------------------|----------------------|--------------------|--------------------|
| TIES's k of n entries | ceil(d n), >= 1      | int(d n) + 1, <= n | int(d n), >= 1     |
| sign where sum is 0   | none (entry is 0)    | the majority sign  | +1                 |
| DARE's rescale        | 1 / (1 - drop)       | 1 / (1 - drop)     | L1(tau) / L1(kept) |

and `aggregate=` selects the disjoint merge ("mean", the paper's and
mergekit's `normalize: true`; "sum", FusionBench's default `merge_func` and
mergekit's `normalize: false`). Reproducing each tool's merge:

- FusionBench `TiesMergingAlgorithm(scaling_factor=lam, threshold=t,
  merge_func=f)`: `ties(base, models, density=t / 100, scale=lam,
  trim="global", convention="fusion_bench", aggregate=f)` (t <= 1 is already
  a fraction; f = "max" is not provided).
- FusionBench `DareTiesMerging(sparsity_ratio=p, ...)`: the same with
  `dare_ties(..., drop=p, key=key)`; `DareTaskArithmetic`: `dare(drop=p,
  scale=lam)` (any convention). Its `rescale=False` is the rule
  `CONVENTIONS["fusion_bench"]._replace(rescale="none")`.
- mergekit `ties` (one `weight` w for every model, `density` d, `lambda`
  lam): `ties(density=d, scale=lam, convention="mergekit")`; with
  `normalize: false`, `aggregate="sum", scale=lam * w`.
- mergekit `dare_ties` (its `density` d is DARE's keep probability, and it
  does no magnitude trim; `normalize: false` by default): `dare_ties(drop=1 -
  d, density=1.0, scale=lam * w, convention="mergekit", aggregate="sum")`.
- mergekit `dare_linear` and `task_arithmetic` (weights w_i): `dare(drop=1 -
  d, scale=[lam * w_i], convention="mergekit")` and
  `task_arithmetic(scale=[lam * w_i])`.

What stays different: the random streams (both tools draw DARE's masks with
torch); mergekit's TIES with unequal weights (it elects on the weighted task
vectors and divides by the agreeing models' summed weights); mergekit keeps
exactly k entries, breaking ties in magnitude by its sort's order, where
every convention here keeps all entries tied with the k-th; mergekit works
in the model's dtype (e.g. bfloat16) where these work in float32; and where
the tools fail (mergekit's k = 0 assertion, FusionBench's density 1) these
keep 1 entry and every entry.
"""

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any, NamedTuple
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import tree

PyTree = Any

TRIMS = ("tensor", "global")


def keep_count(density: float, size: int) -> int:
  """TIES's k: how many of `size` entries a trim at `density` keeps.

  k = ceil(density * size), ignoring float error below 1e-6 (so 0.7 of 10
  entries is 7, not the 8 that ceil(0.7 * 10) = ceil(7.000000000000001)
  gives); at least 1 of a non-empty leaf.
  """
  return min(size, max(1, math.ceil(density * size - 1e-6)))


def _keep_count_floor_plus_one(density: float, size: int) -> int:
  """FusionBench's k: int(density * size) + 1, at most size.

  `topk_values_mask` keeps the entries at or above the (size -
  int(density * size))-th smallest magnitude.
  """
  return min(size, int(density * size) + 1)


def _keep_count_floor(density: float, size: int) -> int:
  """mergekit's k: int(density * size), at least 1 of a non-empty leaf.

  mergekit's `sparsify.magnitude` fails on k = 0; this keeps 1 entry there.
  """
  return min(size, max(1, int(density * size)))


KEEP_RULES = {
    "ceil": keep_count,
    "floor_plus_one": _keep_count_floor_plus_one,
    "floor": _keep_count_floor,
}


def _elect_sign(total: jax.Array, majority: jax.Array) -> jax.Array:
  """sign(total): an entry whose trimmed values sum to 0 has no sign."""
  del majority
  return jnp.sign(total)


def _elect_sign_or_positive(total: jax.Array, majority: jax.Array) -> jax.Array:
  """+1 where total >= 0, else -1 (mergekit's `get_mask(method="sum")`)."""
  del majority
  return jnp.where(total >= 0, 1, -1).astype(total.dtype)


def _elect_sign_or_majority(total: jax.Array, majority: jax.Array) -> jax.Array:
  """sign(total), and the model-wide `majority` sign where total is 0.

  FusionBench's `resolve_sign`; `majority` is `_majority_sign` of the model.
  """
  return jnp.where(total == 0, majority, jnp.sign(total))


ZERO_SIGNS = {
    "none": _elect_sign,
    "positive": _elect_sign_or_positive,
    "majority": _elect_sign_or_majority,
}


def _rescale_inverse_keep(taus: jax.Array, kept: jax.Array, keep: float) -> jax.Array:
  """The kept entries divided by the keep probability, 0 elsewhere."""
  return jnp.where(kept, taus / keep, 0)


_L1_EPS = 1e-7  # mergekit's `rescaled_masked_tensor` leaves smaller norms alone.


def _rescale_l1(taus: jax.Array, kept: jax.Array, keep: float) -> jax.Array:
  """The kept entries times ||tau_i||_1 / ||kept tau_i||_1 of their leaf.

  taus, kept: [N, *shape]. Unscaled where either norm is below 1e-7
  (mergekit's `rescaled_masked_tensor` with `RescaleNorm.l1`).
  """
  del keep
  dropped = jnp.where(kept, taus, 0)
  axes = tuple(range(1, taus.ndim))
  before = jnp.sum(jnp.abs(taus), axis=axes, keepdims=True)
  after = jnp.sum(jnp.abs(dropped), axis=axes, keepdims=True)
  scaled = (before >= _L1_EPS) & (after >= _L1_EPS)
  return jnp.where(scaled, dropped * (before / jnp.where(scaled, after, 1)), dropped)


def _rescale_none(taus: jax.Array, kept: jax.Array, keep: float) -> jax.Array:
  """The kept entries as they are (the tools' `rescale=False`)."""
  del keep
  return jnp.where(kept, taus, 0)


RESCALES = {
    "inverse_keep": _rescale_inverse_keep,
    "l1": _rescale_l1,
    "none": _rescale_none,
}


def _agreeing_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  """The agreeing values' sum over their count; 0 where none agrees."""
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0)


def _agreeing_sum(total: jax.Array, count: jax.Array) -> jax.Array:
  """The agreeing values' sum."""
  del count
  return total


AGGREGATES = {"mean": _agreeing_mean, "sum": _agreeing_sum}


class Convention(NamedTuple):
  """A tool's rules for TIES's trim and elect and DARE's rescale.

  Attributes:
    keep_rule: how many of a trim's n entries it keeps, a key of `KEEP_RULES`:
      "ceil" (`keep_count`), "floor_plus_one" (int(d n) + 1, at most n) or
      "floor" (int(d n), at least 1).
    zero_sign: the elected sign of an entry whose trimmed values sum to
      exactly 0, a key of `ZERO_SIGNS`: "none" (no model agrees, the entry is
      0), "positive" (+1) or "majority" (the sign of the number of the model's
      entries elected + minus those elected -, as `ties_sign_balance` counts
      them; -1 where that is 0, as FusionBench's selection treats a 0 sign).
    rescale: DARE's factor on the entries it keeps, a key of `RESCALES`:
      "inverse_keep" (1 / (1 - drop)), "l1" (per leaf and model, ||tau_i||_1
      over the kept entries' L1 norm, as mergekit) or "none". The L1 factor
      is biased on small leaves: it is computed from the mask it corrects, so
      a one-entry leaf that survives is scaled by 1 and its expected value is
      (1 - drop) tau, not tau (only on large leaves does the factor
      concentrate at 1 / (1 - drop)).
  """

  keep_rule: str
  zero_sign: str
  rescale: str

  def keep_count(self, density: float, size: int) -> int:
    """k: how many of `size` entries a trim at `density` keeps."""
    return KEEP_RULES[self.keep_rule](density, size)


CONVENTIONS = {
    "mergejax": Convention(keep_rule="ceil", zero_sign="none", rescale="inverse_keep"),
    "fusion_bench": Convention(
        keep_rule="floor_plus_one", zero_sign="majority", rescale="inverse_keep"),
    "mergekit": Convention(keep_rule="floor", zero_sign="positive", rescale="l1"),
}


def _path_hash(path: Sequence[Any]) -> np.uint32:
  """crc32 of the leaf's path as `a/b/c`: what `leaf_key` folds in."""
  return np.uint32(zlib.crc32(tree.path_str(path).encode()))


def leaf_key(key: jax.Array, model_index: int, path: Sequence[Any]) -> jax.Array:
  """The random key of DARE's drop mask for one leaf of one model.

  `fold_in(fold_in(key, model_index), crc32(path_str(path)))`: it depends on
  the leaf's path, not on its position in the tree, so a merge that sees one
  leaf at a time, wrapped in dicts nested along the same path, draws the same
  mask.

  Args:
    key: the merge's key.
    model_index: i, the model's index in `models`.
    path: the leaf's key path (JAX path entries or plain key names).
  """
  return jax.random.fold_in(jax.random.fold_in(key, model_index), _path_hash(path))


def _check_models(base: PyTree, models: Sequence[PyTree], name: str = "models", base_name: str = "the base",
                  what: str = "model") -> list[PyTree]:
  """The models as a list, after checking there is one and all match the base.

  The errors name the argument (`name`, e.g. "pool"), the tree it must match
  (`base_name`) and what one entry is (`what`, e.g. "task vector").
  """
  models = list(models)
  if not models:
    raise ValueError(f"{name}: need at least one {what}")
  for i, model in enumerate(models):
    try:
      tree.check_same_shapes(base, model)
    except ValueError as e:
      raise ValueError(f"{name}[{i}] does not match {base_name}: {e}") from None
  return models


def _check_scale(scale: float) -> float:
  if not math.isfinite(scale):
    raise ValueError(f"scale must be finite, got {scale}")
  return float(scale)


def _per_model_values(
    value: float | Sequence[float], num: int, name: str, plural: str, nonnegative: bool = False
) -> np.ndarray:
  """f32[N]: one value per model, from a float or a sequence of N finite floats.

  Errors name the argument: "{name}: N models but M {plural}", "{name} must be
  finite[ and >= 0]".
  """
  values = np.asarray(value, np.float64)
  if values.ndim == 0:
    values = np.full(num, values)
  if values.shape != (num,):
    raise ValueError(f"{name}: {num} models but {values.size} {plural}")
  valid = np.isfinite(values) & (values >= 0 if nonnegative else True)
  if not np.all(valid):
    raise ValueError(f"{name} must be finite{' and >= 0' if nonnegative else ''}, got {values.tolist()}")
  return values.astype(np.float32)


def _model_scales(scale: float | Sequence[float], num: int) -> np.ndarray:
  """f32[N]: one scale per model, from a float or a sequence of N finite floats."""
  return _per_model_values(scale, num, "scale", "scales")


def _check_density(density: float) -> float:
  if not 0 < density <= 1:
    raise ValueError(f"density must be in (0, 1], got {density}")
  return float(density)


def _keep_probability(drop: float, key: jax.Array | None) -> float:
  """1 - drop, after checking that drop is in [0, 1) and has a key."""
  if not 0 <= drop < 1:
    raise ValueError(f"drop must be in [0, 1), got {drop}")
  if key is None:
    raise ValueError("DARE needs a random key; got key=None")
  return 1.0 - float(drop)


def _check_trim(trim: str, thresholds: Sequence[float] | None, num: int) -> None:
  if trim not in TRIMS:
    raise ValueError(f"trim must be one of {TRIMS}, got {trim!r}")
  if thresholds is None:
    return
  if trim != "global":
    raise ValueError("thresholds are the global trim's; pass trim='global'")
  t = np.asarray(thresholds, np.float64)
  if t.shape != (num,):
    raise ValueError(f"thresholds: {num} models but thresholds of shape {t.shape}")
  if not np.all(np.isfinite(t) & (t >= 0)):
    raise ValueError(f"thresholds must be finite and >= 0, got {t.tolist()}")


def _check_convention(convention: str | Convention) -> Convention:
  """The Convention a name of CONVENTIONS (or a Convention) stands for."""
  if isinstance(convention, Convention):
    for field, table in zip(Convention._fields, (KEEP_RULES, ZERO_SIGNS, RESCALES)):
      value = getattr(convention, field)
      if value not in table:
        raise ValueError(f"convention.{field} must be one of {tuple(table)}, got {value!r}")
    return convention
  if convention not in CONVENTIONS:
    raise ValueError(
        f"convention must be one of {tuple(CONVENTIONS)} or a Convention, got {convention!r}")
  return CONVENTIONS[convention]


def _check_aggregate(aggregate: str) -> str:
  if aggregate not in AGGREGATES:
    raise ValueError(f"aggregate must be one of {tuple(AGGREGATES)}, got {aggregate!r}")
  return aggregate


def _check_sign_balance(sign_balance: int | None, convention: Convention) -> None:
  if sign_balance is None:
    return
  if convention.zero_sign != "majority":
    raise ValueError("sign_balance is the majority zero sign's; pass a convention with it")
  if isinstance(sign_balance, bool) or not isinstance(sign_balance, (int, np.integer)):
    raise ValueError(f"sign_balance must be an integer, got {sign_balance!r}")


def _delta(x: jax.Array, b: jax.Array) -> jax.Array:
  """x - b in float32, or wider where b is."""
  dtype = jnp.promote_types(jnp.result_type(b), jnp.float32)
  return x.astype(dtype) - b.astype(dtype)


def _leaf_task_vectors(
    b: jax.Array,
    xs: Sequence[jax.Array],
    keys: jax.Array | None,
    keep: float,
    rescale: str = "inverse_keep",
) -> jax.Array:
  """f32[N, *b.shape]: each model's task vector at one leaf.

  With keys (key[N], the models' `leaf_key`s of this leaf), DARE's: model i
  keeps an entry where `jax.random.bernoulli(keys[i], keep, b.shape)`,
  rescaled by `RESCALES[rescale]` (divided by `keep` by default), and is 0
  elsewhere.
  """
  taus = jnp.stack([_delta(x, b) for x in xs])
  if keys is None:
    return taus
  kept = jax.vmap(lambda k: jax.random.bernoulli(k, keep, b.shape))(keys)
  return RESCALES[rescale](taus, kept, keep)


@functools.partial(jax.jit, static_argnums=1)
def _leaf_keys(key: jax.Array, num: int, path_hashes: jax.Array) -> jax.Array:
  """key[L, N]: `leaf_key(key, i, path)` of every leaf and model, in one call.

  Args:
    key: the merge's key.
    num: N, a static count of models.
    path_hashes: uint32[L], `_path_hash` of each leaf's path.
  """
  def leaf(path_hash):
    return jax.vmap(
        lambda i: jax.random.fold_in(jax.random.fold_in(key, i), path_hash)
    )(jnp.arange(num))

  return jax.vmap(leaf)(path_hashes)


def _rebase(b: jax.Array, merged: jax.Array) -> jax.Array:
  """b + merged, in b's dtype."""
  return (b.astype(merged.dtype) + merged).astype(jnp.result_type(b))


def _per_model(values: jax.Array, ndim: int) -> jax.Array:
  """f32[N] reshaped to broadcast against f32[N, *shape] of `ndim` axes."""
  return values.reshape((-1,) + (1,) * ndim)


def _map_leaves(
    fn: Callable[[jax.Array, list[jax.Array], jax.Array | None], jax.Array],
    base: PyTree,
    models: list[PyTree],
    key: jax.Array | None,
) -> PyTree:
  """`fn(b, xs, keys)` for each leaf of the base, in the base's structure.

  `keys` are the models' DARE keys of the leaf (key[N], `leaf_key`), all
  derived in one call; None without a key. `fn` is jit-compiled per leaf
  shape, so the many layers of one shape in a deep model share a compilation
  (and the random bits one generator).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(base)
  model_leaves = [treedef.flatten_up_to(m) for m in models]
  if key is None:
    keys = [None] * len(flat)
  else:
    hashes = np.array([_path_hash(path) for path, _ in flat], np.uint32)
    keys = list(_leaf_keys(key, len(models), hashes))
  return treedef.unflatten([
      fn(b, [leaves[j] for leaves in model_leaves], keys[j])
      for j, (_, b) in enumerate(flat)
  ])


@functools.partial(jax.jit, static_argnames="rescale")
def _task_arithmetic_leaf(b, xs, keys, scales, keep, rescale="inverse_keep"):
  """b + sum_i scales[i] tau_i at one leaf; scales: f32[N]."""
  taus = _leaf_task_vectors(b, xs, keys, keep, rescale)
  return _rebase(b, jnp.sum(_per_model(scales, b.ndim) * taus, axis=0))


def _task_arithmetic(
    base: PyTree,
    models: list[PyTree],
    scales: np.ndarray,
    key: jax.Array | None,
    keep: float,
    rescale: str = "inverse_keep",
) -> PyTree:
  """base + sum_i scales[i] tau_i (DARE-dropped with a key); scales: f32[N]."""
  scales = jnp.asarray(scales)
  return _map_leaves(
      lambda b, xs, keys: _task_arithmetic_leaf(b, xs, keys, scales, keep, rescale),
      base, models, key,
  )


def _kth_largest(values: jax.Array, k: jax.Array) -> jax.Array:
  """f32[N]: the k-th largest entry of each row of values: f32[N, ...] >= 0.

  A bisection on the entries' bit patterns (for floats >= 0 they order as the
  values do): the largest pattern t with `count(values >= t) >= k` is the
  k-th largest entry, exactly what sorting finds. Each of its 31 (63 for
  float64) steps is a count, a sum over the entries, so on sharded values it
  is a partial count per device and an all-reduce of N integers: nothing is
  gathered, where a sort gathers the whole row onto every device.
  """
  return _kth_largest_of([values], k)


def _kth_largest_of(parts: Sequence[jax.Array], k: jax.Array) -> jax.Array:
  """f32[N]: `_kth_largest` of the rows of all parts (f32[N, ...] >= 0 each)
  together, as if concatenated along their flattened entries."""
  dtype = jnp.result_type(*parts, jnp.float32)
  num = len(parts[0])
  parts = [p.astype(dtype) for p in parts if p.size]
  if not parts:  # Empty leaves: nothing to trim.
    return jnp.zeros((num,), dtype)
  int_dtype = jnp.int64 if dtype == jnp.float64 else jnp.int32
  entries = sum(math.prod(p.shape[1:]) for p in parts)
  if entries > jnp.iinfo(jnp.int32).max:  # the counts are int32 (int64 needs jax_enable_x64)
    raise ValueError(f"a top-k threshold over {entries} entries per row: more than its int32 counts hold (int64"
                     " needs jax_enable_x64); split the merge (TIES: trim per tensor, or out of core with"
                     " mj.io.merge_checkpoints)")
  bits = [jax.lax.bitcast_convert_type(p, int_dtype) for p in parts]

  def count_at_least(t):
    return sum(
        jnp.sum(b >= t.reshape((-1,) + (1,) * (b.ndim - 1)), axis=tuple(range(1, b.ndim)),
                dtype=jnp.int32)
        for b in bits
    )

  def step(_, bounds):  # count(>= lo) >= k > count(>= hi) throughout.
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = count_at_least(mid) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  info = jnp.iinfo(int_dtype)
  lo = jnp.zeros((num,), int_dtype)
  hi = jnp.full((num,), info.max, int_dtype)
  lo, _ = jax.lax.fori_loop(0, info.bits - 1, step, (lo, hi))
  return jax.lax.bitcast_convert_type(lo, dtype)


def _disjoint_merge(
    trimmed: jax.Array,
    majority: jax.Array | float = 0.0,
    zero_sign: str = "none",
    aggregate: str = "mean",
) -> jax.Array:
  """TIES's elect and disjoint merge over trimmed: f32[N, *shape].

  The elected sign of an entry is the sign of the sum of the models' trimmed
  values (`ZERO_SIGNS[zero_sign]` where that sum is 0; `majority` is the
  "majority" rule's sign); the result aggregates (`AGGREGATES[aggregate]`,
  by default the mean) the non-zero values with that sign, and is 0 where
  there is none.
  """
  elected = ZERO_SIGNS[zero_sign](jnp.sum(trimmed, axis=0), majority)
  agree = (jnp.sign(trimmed) == elected) & (trimmed != 0)
  count = jnp.sum(agree, axis=0)
  total = jnp.sum(jnp.where(agree, trimmed, 0), axis=0)
  return AGGREGATES[aggregate](total, count)


def _leaf_trimmed(b, xs, keys, trim_at, keep, rescale, per_tensor):
  """f32[N, *b.shape]: the task vectors at one leaf (DARE-dropped with keys),
  each keeping its entries with |tau_i| >= its threshold: its trim_at-th
  largest |tau_i| (per_tensor, trim_at an int k), else trim_at: f32[N]."""
  taus = _leaf_task_vectors(b, xs, keys, keep, rescale)
  if per_tensor:
    trim_at = _kth_largest(jnp.abs(taus), trim_at)
  return jnp.where(jnp.abs(taus) >= _per_model(trim_at, b.ndim), taus, 0)


@functools.partial(jax.jit, static_argnames=("convention", "aggregate", "per_tensor"))
def _ties_leaf(b, xs, keys, trim_at, scale, keep, majority, *, convention, aggregate, per_tensor):
  """TIES at one leaf: b + scale * the disjoint merge of `_leaf_trimmed`."""
  trimmed = _leaf_trimmed(b, xs, keys, trim_at, keep, convention.rescale, per_tensor)
  return _rebase(b, scale * _disjoint_merge(trimmed, majority, convention.zero_sign, aggregate))


@functools.partial(jax.jit, static_argnames=("rescale", "per_tensor"))
def _leaf_sign_balance(b, xs, keys, trim_at, keep, *, rescale, per_tensor):
  """int32: the leaf's entries whose trimmed sum is > 0 minus those < 0."""
  trimmed = _leaf_trimmed(b, xs, keys, trim_at, keep, rescale, per_tensor)
  return jnp.sum(jnp.sign(jnp.sum(trimmed, axis=0)).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames="rescale")
def _leaf_magnitudes(b, xs, keys, keep, rescale="inverse_keep"):
  """f32[N, *b.shape]: |tau_i| at one leaf."""
  return jnp.abs(_leaf_task_vectors(b, xs, keys, keep, rescale))


_kth_largest_of_jit = jax.jit(_kth_largest_of)


def _global_thresholds(
    base: PyTree,
    models: list[PyTree],
    k: int,
    key: jax.Array | None,
    keep: float,
    rescale: str = "inverse_keep",
) -> jax.Array:
  """f32[N]: each model's k-th largest |tau_i| over all its leaves."""
  magnitudes = _map_leaves(
      lambda b, xs, keys: _leaf_magnitudes(b, xs, keys, keep, rescale), base, models, key
  )
  return _kth_largest_of_jit(jax.tree.leaves(magnitudes), k)


def _trim_points(
    base: PyTree,
    models: list[PyTree],
    density: float,
    trim: str,
    thresholds: Sequence[float] | None,
    key: jax.Array | None,
    keep: float,
    convention: Convention,
) -> Callable[[jax.Array], Any]:
  """`_leaf_trimmed`'s trim_at for each leaf b: the tensor trim's k of b, or
  the global trim's thresholds (computed in a first pass when None)."""
  if trim == "tensor":
    return lambda b: convention.keep_count(density, np.size(b))
  if thresholds is None:
    k = convention.keep_count(density, tree.num_params(base))
    thresholds = _global_thresholds(base, models, k, key, keep, convention.rescale)
  thresholds = jnp.asarray(thresholds, jnp.float32)
  return lambda b: thresholds


def _sign_balance(
    base: PyTree,
    models: list[PyTree],
    trim_at: Callable[[jax.Array], Any],
    trim: str,
    key: jax.Array | None,
    keep: float,
    rescale: str,
) -> int:
  """The model's entries whose trimmed sum is > 0 minus those < 0."""
  balances = _map_leaves(
      lambda b, xs, keys: _leaf_sign_balance(
          b, xs, keys, trim_at(b), keep, rescale=rescale, per_tensor=trim == "tensor"),
      base, models, key,
  )
  return sum(int(x) for x in jax.device_get(jax.tree.leaves(balances)))


def _majority_sign(sign_balance: int) -> float:
  """FusionBench's majority sign: +1 for a positive balance, else -1 (its
  selection treats the 0 sign of a 0 balance as -1)."""
  return 1.0 if sign_balance > 0 else -1.0


def task_vector(base: PyTree, tuned: PyTree) -> PyTree:
  """tuned - base, leaf by leaf (in the promoted dtype of each pair of leaves).

  Raises:
    ValueError: the trees differ in structure or in a leaf's shape (the
      message names the leaf's path).
  """
  _check_models(base, [tuned])
  return _subtract(tuned, base)


_subtract = jax.jit(tree.sub)


def task_arithmetic(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    scale: float | Sequence[float] = 1.0,
) -> PyTree:
  """Task arithmetic: base + sum_i scale_i (models[i] - base).

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    scale: one float for every model, or N floats, one per model (a negative
      scale subtracts a task).

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), or a wrong number of scales or a non-finite one.
  """
  models = _check_models(base, models)
  scales = _model_scales(scale, len(models))
  return _task_arithmetic(base, models, scales, None, 1.0)


def ties_thresholds(
    base: PyTree,
    models: Sequence[PyTree],
    density: float,
    *,
    drop: float = 0.0,
    key: jax.Array | None = None,
    convention: str | Convention = "mergejax",
) -> list[float]:
  """Each model's global TIES threshold: the k-th largest |tau_i| entry.

  k = `keep_count(density, n)` (the convention's keep rule) where n is the
  number of entries of the whole model. The global trim keeps the entries of
  tau_i with |tau_i| >= its threshold (k of them, and every tie with the
  k-th). An out-of-core merge
  computes these in a first pass and passes them to `ties` or `dare_ties` as
  `thresholds=`.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it.
    density: the fraction of entries to keep, in (0, 1].
    drop: with `key`, the thresholds of DARE's dropped and rescaled task
      vectors, as `dare_ties` trims them.
    key: DARE's key (required when drop > 0).
    convention: a name of `CONVENTIONS` or a `Convention`: its keep rule and
      DARE rescale, as the merge's.

  Returns:
    N thresholds, one per model.

  Raises:
    ValueError: no model, mismatched trees, density outside (0, 1], drop
      outside [0, 1), drop > 0 without a key, or an unknown convention.
  """
  models = _check_models(base, models)
  density = _check_density(density)
  keep = 1.0 if key is None and drop == 0 else _keep_probability(drop, key)
  convention = _check_convention(convention)
  k = convention.keep_count(density, tree.num_params(base))
  thresholds = _global_thresholds(base, models, k, key, keep, convention.rescale)
  return [float(t) for t in jax.device_get(thresholds)]


def ties_sign_balance(
    base: PyTree,
    models: Sequence[PyTree],
    density: float,
    *,
    trim: str = "tensor",
    thresholds: Sequence[float] | None = None,
    drop: float = 0.0,
    key: jax.Array | None = None,
    convention: str | Convention = "mergejax",
) -> int:
  """The count behind FusionBench's majority sign, over the whole model.

  After the trim (as `ties` or, with `drop` and `key`, `dare_ties` trims),
  the number of entries whose sum over models is > 0 minus the number whose
  sum is < 0. The "majority" zero-sign rule (convention "fusion_bench")
  elects +1 where an entry's sum is 0 if this is > 0, else -1. An
  out-of-core merge computes it in a pass (after the thresholds') and passes
  it to `ties` or `dare_ties` as `sign_balance=`; the balances of disjoint
  parts of a model add up.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it.
    density: the fraction of entries to keep, in (0, 1].
    trim: "tensor" or "global", as the merge's.
    thresholds: with `trim="global"`, the thresholds given explicitly.
    drop: with `key`, DARE's drop probability, as `dare_ties`'s.
    key: DARE's key (required when drop > 0).
    convention: a name of `CONVENTIONS` or a `Convention`: its keep rule and
      DARE rescale, as the merge's.

  Returns:
    An integer in [-n, n], n the number of entries of the model.

  Raises:
    ValueError: as `ties_thresholds`, and `ties`'s trim errors.
  """
  models = _check_models(base, models)
  density = _check_density(density)
  _check_trim(trim, thresholds, len(models))
  keep = 1.0 if key is None and drop == 0 else _keep_probability(drop, key)
  convention = _check_convention(convention)
  trim_at = _trim_points(base, models, density, trim, thresholds, key, keep, convention)
  return _sign_balance(base, models, trim_at, trim, key, keep, convention.rescale)


def _ties_with_trim(
    base: PyTree,
    models: list[PyTree],
    density: float,
    scale: float,
    trim: str,
    thresholds: Sequence[float] | None,
    key: jax.Array | None,
    keep: float,
    convention: Convention = CONVENTIONS["mergejax"],
    aggregate: str = "mean",
    sign_balance: int | None = None,
) -> PyTree:
  """TIES (over DARE-dropped task vectors, with a key), leaf by leaf."""
  trim_at = _trim_points(base, models, density, trim, thresholds, key, keep, convention)
  majority = 0.0
  if convention.zero_sign == "majority":
    if sign_balance is None:
      sign_balance = _sign_balance(base, models, trim_at, trim, key, keep, convention.rescale)
    majority = _majority_sign(sign_balance)
  return _map_leaves(
      lambda b, xs, keys: _ties_leaf(
          b, xs, keys, trim_at(b), scale, keep, majority,
          convention=convention, aggregate=aggregate, per_tensor=trim == "tensor"),
      base, models, key,
  )


def ties(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    density: float = 0.2,
    scale: float = 1.0,
    trim: str = "tensor",
    thresholds: Sequence[float] | None = None,
    convention: str | Convention = "mergejax",
    aggregate: str = "mean",
    sign_balance: int | None = None,
) -> PyTree:
  """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

  TIES-Merging: Resolving Interference When Merging Models, arXiv:2306.01708,
  Algorithm 1.

  1. Trim: each tau_i = models[i] - base keeps its entries with |tau_i| >= a
     threshold, the k-th largest |tau_i|, with k = `keep_count(density,
     size)` (or the convention's keep rule): per leaf (`trim="tensor"`, size
     = the leaf's entries) or over all leaves of model i (`trim="global"`, size = the model's entries). Entries
     tied in magnitude with the k-th are all kept, so a trim may keep more
     than k.
  2. Elect: the sign of each entry is the sign of the sum over models of the
     trimmed tau_i (where that sum is exactly 0: no sign by default, or the
     convention's zero-sign rule).
  3. Disjoint merge: each entry is the mean (or, `aggregate="sum"`, the sum)
     over the models whose trimmed entry is non-zero and has the elected
     sign; 0 where no model does.

  The result is base + scale * merged. With density 1 a single model (or N
  copies of one) comes back unchanged at scale 1 (with the mean).

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    density: the fraction of each task vector's entries to keep, in (0, 1].
    scale: lambda, the factor on the merged task vector.
    trim: "tensor" or "global".
    thresholds: with `trim="global"`, model i's threshold given explicitly
      (as `ties_thresholds` computes it, which is what happens when None; an
      out-of-core merge passes it after a first pass). `density` is then
      unused.
    convention: "mergejax", "fusion_bench", "mergekit" (see `CONVENTIONS`
      and the module's table) or a `Convention`: the keep rule and the sign
      of entries whose trimmed sum is 0.
    aggregate: "mean" (the paper's disjoint mean) or "sum" of the agreeing
      values.
    sign_balance: with the "majority" zero sign, the model's
      `ties_sign_balance` given explicitly (an out-of-core merge passes it
      after a pass; computed when None).

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), density outside (0, 1], an unknown trim, thresholds with
      the tensor trim, or thresholds of the wrong count, negative or
      non-finite, an unknown convention or aggregate, or a sign_balance that
      is not an integer or comes without the "majority" zero sign.
  """
  models, density, scale, convention, aggregate = _check_ties(
      base, models, density, scale, trim, thresholds, convention, aggregate, sign_balance)
  return _ties_with_trim(
      base, models, density, scale, trim, thresholds, None, 1.0,
      convention, aggregate, sign_balance,
  )


def _check_ties(base, models, density, scale, trim, thresholds, convention, aggregate, sign_balance):
  """`ties`'s argument checks: (models, density, scale, convention, aggregate), checked."""
  models = _check_models(base, models)
  density = _check_density(density)
  scale = _check_scale(scale)
  _check_trim(trim, thresholds, len(models))
  convention = _check_convention(convention)
  aggregate = _check_aggregate(aggregate)
  _check_sign_balance(sign_balance, convention)
  return models, density, scale, convention, aggregate


def dare(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    drop: float,
    key: jax.Array,
    scale: float | Sequence[float] = 1.0,
    convention: str | Convention = "mergejax",
) -> PyTree:
  """DARE (Yu et al. 2024): drop and rescale task vectors, then add them.

  Language Models are Super Mario: Absorbing Abilities from Homologous
  Models as a Free Lunch, arXiv:2311.03099 (its drop and rescale).

  Each entry of tau_i = models[i] - base is kept with probability 1 - drop
  and divided by it (or rescaled by the convention's rule, e.g. mergekit's
  L1 ratio), else set to 0; the mask of the leaf at path p of model i
  is `jax.random.bernoulli(leaf_key(key, i, p), 1 - drop, shape)`. The result
  is base + sum_i scale_i * dropped tau_i (task arithmetic), so drop 0 is
  task arithmetic.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    drop: the drop probability, in [0, 1).
    key: a JAX random key; the same key gives the same merge.
    scale: one float for every model, or N floats, one per model.
    convention: a name of `CONVENTIONS` or a `Convention`: its rescale of
      the kept entries.

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: no model, a model that does not match the base (naming the
      leaf path), drop outside [0, 1), a wrong number of scales or a
      non-finite one, or an unknown convention.
  """
  models = _check_models(base, models)
  keep = _keep_probability(drop, key)
  scales = _model_scales(scale, len(models))
  convention = _check_convention(convention)
  return _task_arithmetic(base, models, scales, key, keep, convention.rescale)


def dare_ties(
    base: PyTree,
    models: Sequence[PyTree],
    *,
    drop: float,
    density: float,
    key: jax.Array,
    scale: float = 1.0,
    trim: str = "tensor",
    thresholds: Sequence[float] | None = None,
    convention: str | Convention = "mergejax",
    aggregate: str = "mean",
    sign_balance: int | None = None,
) -> PyTree:
  """DARE's drop and rescale (see `dare`), then TIES (see `ties`).

  The trim, its thresholds included, works on the dropped and rescaled task
  vectors (`ties_thresholds(..., drop=drop, key=key)` computes those of the
  global trim, `ties_sign_balance(..., drop=drop, key=key)` the majority
  sign's balance). Drop 0 is `ties`.

  Args:
    base: the pre-trained model.
    models: N >= 1 models fine-tuned from it (same structure and shapes).
    drop: the drop probability, in [0, 1).
    density: the fraction of each dropped task vector's entries to keep, in
      (0, 1].
    key: a JAX random key; the same key gives the same merge.
    scale: lambda, the factor on the merged task vector.
    trim: "tensor" or "global".
    thresholds: with `trim="global"`, model i's threshold given explicitly.
    convention: as `ties`'s, and its rescale as `dare`'s.
    aggregate: "mean" or "sum", as `ties`'s.
    sign_balance: as `ties`'s.

  Returns:
    The merged model, in the base's leaf dtypes.

  Raises:
    ValueError: as `ties` and `dare`.
  """
  models, density, scale, convention, aggregate = _check_ties(
      base, models, density, scale, trim, thresholds, convention, aggregate, sign_balance)
  keep = _keep_probability(drop, key)
  return _ties_with_trim(
      base, models, density, scale, trim, thresholds, key, keep,
      convention, aggregate, sign_balance,
  )
