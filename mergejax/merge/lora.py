"""Low-rank merges: LoRA adapters as pytrees of factors, and their merges.

An adapter is a pytree that mirrors the part of a model it adapts: at each
adapted path it holds a `LoRA(down, up)` pair of factors instead of the
kernel, and the adapted kernel is

    kernel + down @ up,   down: f32[in, r], up: f32[r, out],

the `x @ kernel` convention of Flax: `out` is the kernel's last axis and `in`
all the others flattened row-major (a Dense kernel `(in, out)` as it is, a
convolution kernel `(kh, kw, c_in, c_out)` as `(kh * kw * c_in, c_out)`).
PEFT's factors (`lora_A: [r, in]`, `lora_B: [out, r]`, scaling alpha / r, for
a torch weight `[out, in]`) convert with `lora_from_peft`: down = lora_A^T,
up = (alpha / r) lora_B^T.

    adapters = [mj.merge.lora_extract(base, v, rank=8) for v in tuned]
    merged = mj.merge.lora_apply(base, mj.merge.lora_sum(adapters, scale=0.3))
    small = mj.merge.lora_compress(mj.merge.lora_sum(adapters), rank=16)
    lego = mj.merge.lora_lego(adapters, rank=16, key=key)
    rmm = mj.merge.reversible_merge(adapters, num_basis=2)
    task_2 = mj.merge.reversible_task(rmm, 2)

- `lora_sum`: task arithmetic of adapters, exactly, by concatenating factors.
- `lora_compress`: the truncated SVD of an adapter's product, from QRs of its
  factors and an SVD of an r x r core, never forming the in x out matrix.
- `lora_lego`: LoRA-LEGO (Zhao et al., arXiv 2409.16167), k-means over the
  adapters' rank-1 units.
- `reversible_merge`, `reversible_task`: Reversible Model Merging (Alipour and
  Amiri, arXiv 2510.14163), a shared basis of p adapters from which each
  task's adapter is a linear combination.

Every function checks its arguments before any work (errors name the
adapter and the path) and works one adapted leaf at a time, in float32 (or
wider); `lora_apply` keeps the base's dtypes. A merge that sees one leaf at a
time, wrapped in dicts nested along its path, reproduces the whole merge
(`lora_lego` draws each leaf's key from its path, as `leaf_key`).
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
HIGHEST = jax.lax.Precision.HIGHEST


class LoRA(NamedTuple):
  """One adapted kernel's factors: the kernel's change is `down @ up`.

  Attributes:
    down: f32[in, r], the input-side factor.
    up: f32[r, out], the output-side factor, scaling included.
  """

  down: jax.Array
  up: jax.Array


class ReversibleMerge(NamedTuple):
  """The merged representation of `reversible_merge`.

  Attributes:
    basis: an adapter whose LoRAs hold p basis adapters stacked on a leading
      axis: `down: f32[p, in, r]`, `up: f32[p, r, out]`.
    coefficients: a pytree of the adapters' structure with `f32[N, p]` at
      each adapted path: row t is task t's coefficients on that leaf's basis.
  """

  basis: PyTree
  coefficients: PyTree


def _is_lora(x: Any) -> bool:
  return isinstance(x, LoRA)


def _factor_dtype(x: Any) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _product(down: jax.Array, up: jax.Array) -> jax.Array:
  """f32[in, out]: down @ up at full precision."""
  dtype = jnp.promote_types(_factor_dtype(down), _factor_dtype(up))
  return jnp.matmul(down.astype(dtype), up.astype(dtype), precision=HIGHEST)


def _leaves(adapter: PyTree, name: str) -> list[tuple[tuple[str, ...], LoRA]]:
  """`[(key path, LoRA)]` of an adapter, after checking every pair.

  Raises:
    ValueError: a leaf that is not a LoRA, or factors that are not 2-D or
      disagree on the rank (naming `name` and the path).
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=_is_lora)
  out = []
  for path, leaf in flat:
    where = f"{name}: {tree.path_str(path)}"
    if not _is_lora(leaf):
      raise ValueError(f"{where}: {type(leaf).__name__} is not a LoRA(down, up)")
    down, up = np.shape(leaf.down), np.shape(leaf.up)
    if len(down) != 2 or len(up) != 2:
      raise ValueError(f"{where}: down {down} and up {up} must both be 2-D")
    if down[1] != up[0]:
      raise ValueError(f"{where}: down {down} and up {up} disagree on the rank")
    out.append((tree.key_path(path), leaf))
  return out


def _rank(lora: LoRA) -> int:
  return np.shape(lora.down)[1]


def _check_adapters(
    adapters: Sequence[PyTree], same_rank: bool
) -> list[list[tuple[tuple[str, ...], LoRA]]]:
  """Each adapter's `_leaves`, after checking they adapt the same kernels.

  Raises:
    ValueError: no adapter, a bad adapter, adapters with different adapted
      paths, factors of different in or out sizes at one path, or (with
      `same_rank`) of different ranks.
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError("adapters: need at least one adapter")
  leaves = [_leaves(a, f"adapters[{i}]") for i, a in enumerate(adapters)]
  try:
    tree.check_same_structure(*adapters)
  except ValueError as e:
    raise ValueError(f"adapters (tree i is adapters[i]): {e}") from None
  for i, other in enumerate(leaves[1:], start=1):
    for (path, a), (_, b) in zip(leaves[0], other):
      sizes_a = (np.shape(a.down)[0], np.shape(a.up)[1])
      sizes_b = (np.shape(b.down)[0], np.shape(b.up)[1])
      if sizes_a != sizes_b:
        raise ValueError(
            f"adapters[{i}]: {'/'.join(path)}: (in, out) {sizes_b}, but adapters[0] has {sizes_a}"
        )
      if same_rank and _rank(a) != _rank(b):
        raise ValueError(
            f"adapters[{i}]: {'/'.join(path)}: rank {_rank(b)}, but adapters[0] has rank {_rank(a)}"
        )
  return leaves


def _check_rank(rank: int, name: str = "rank") -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {rank!r}")
  return int(rank)


def _rebuild(adapter: PyTree, leaves: Sequence[Any]) -> PyTree:
  """`adapter`'s structure with its LoRAs replaced by `leaves`, in order."""
  treedef = jax.tree.structure(adapter, is_leaf=_is_lora)
  return jax.tree.unflatten(treedef, list(leaves))


def lora_from_peft(lora_A: jax.Array, lora_B: jax.Array, alpha: float) -> LoRA:
  """PEFT's factors of one layer in this module's convention.

  PEFT changes a torch weight `[out, in]` by `(alpha / r) lora_B @ lora_A`;
  the Flax kernel is that weight transposed, so its change is
  `lora_A^T @ ((alpha / r) lora_B^T)`.

  Args:
    lora_A: f32[r, in].
    lora_B: f32[out, r].
    alpha: PEFT's `lora_alpha` (the scaling is alpha / r; for rsLoRA's
      alpha / sqrt(r) pass alpha * sqrt(r)).

  Returns:
    `LoRA(down=lora_A^T, up=(alpha / r) lora_B^T)`, in float32 or wider.

  Raises:
    ValueError: factors that are not 2-D or disagree on the rank, a rank of
      0, or a non-finite or zero alpha.
  """
  a, b = np.shape(lora_A), np.shape(lora_B)
  if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
    raise ValueError(f"lora_A {a} must be [r, in] and lora_B {b} [out, r], one r")
  if a[0] == 0:
    raise ValueError("lora_A and lora_B have rank 0")
  if not (math.isfinite(alpha) and alpha != 0):
    raise ValueError(f"alpha must be finite and non-zero, got {alpha}")
  scaling = float(alpha) / a[0]
  return LoRA(
      jnp.asarray(lora_A).T.astype(_factor_dtype(lora_A)),
      scaling * jnp.asarray(lora_B).T.astype(_factor_dtype(lora_B)),
  )


def lora_to_peft(lora: LoRA, alpha: float) -> tuple[jax.Array, jax.Array]:
  """The inverse of `lora_from_peft`: `(lora_A, lora_B)` for a given alpha.

  Returns:
    `lora_A = down^T: f32[r, in]` and `lora_B = (r / alpha) up^T: f32[out, r]`.

  Raises:
    ValueError: a bad LoRA, a rank of 0, or a non-finite or zero alpha.
  """
  _leaves(lora, "lora")
  if _rank(lora) == 0:
    raise ValueError("lora has rank 0")
  if not (math.isfinite(alpha) and alpha != 0):
    raise ValueError(f"alpha must be finite and non-zero, got {alpha}")
  return jnp.asarray(lora.down).T, (_rank(lora) / float(alpha)) * jnp.asarray(lora.up).T


def _balanced(left: jax.Array, s: jax.Array, right: jax.Array, rank: int) -> LoRA:
  """The rank-`rank` factors of left diag(s) right, s sorted descending.

  down = left_k sqrt(s_k), up = sqrt(s_k) right_k with k = min(rank, len(s));
  zero units pad the factors to exactly `rank`.
  """
  k = min(rank, s.shape[0])
  root = jnp.sqrt(s[:k])
  down = left[:, :k] * root
  up = root[:, None] * right[:k]
  return LoRA(
      jnp.pad(down, ((0, 0), (0, rank - k))), jnp.pad(up, ((0, rank - k), (0, 0)))
  )


@functools.partial(jax.jit, static_argnums=2)
def _extract_leaf(b: jax.Array, x: jax.Array, rank: int) -> LoRA:
  tau = tv._delta(x, b).reshape(-1, b.shape[-1])
  u, s, vt = jnp.linalg.svd(tau, full_matrices=False)
  return _balanced(u, s, vt, rank)


def lora_extract(base: PyTree, tuned: PyTree, rank: int) -> PyTree:
  """The rank-`rank` adapter nearest a full fine-tune (truncated SVD).

  Every leaf of two or more axes is adapted: its task vector tau = tuned -
  base, reshaped to `[in, out]` (see the module's convention), becomes
  `down = U_k sqrt(S_k)`, `up = sqrt(S_k) V_k^T` of its SVD, the best rank-k
  approximation in Frobenius norm (Eckart-Young), k = min(rank, in, out), with
  zero units up to `rank`. Leaves of fewer axes (biases, norms) are not in the
  adapter. This is the post-training SVD that the reversible-merging paper
  applies to fully fine-tuned models.

  Returns:
    An adapter: dicts nested along the paths of the base's leaves of >= 2
    axes, each holding a LoRA of rank `rank`.

  Raises:
    ValueError: trees that differ (naming the path), or a rank below 1.
  """
  tv._check_models(base, [tuned])
  rank = _check_rank(rank)
  tuned_leaves = tree.leaves_by_path(tuned)
  adapter = {}
  for path, b in tree.leaves_by_path(base).items():
    if np.ndim(b) < 2:
      continue
    node = adapter
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = _extract_leaf(b, tuned_leaves[path], rank)
  return adapter


@jax.jit
def _apply_leaf(b: jax.Array, lora: LoRA, scale: jax.Array) -> jax.Array:
  return tv._rebase(b, scale * _product(lora.down, lora.up).reshape(b.shape))


def lora_apply(base: PyTree, adapter: PyTree, *, scale: float = 1.0) -> PyTree:
  """base with `scale * down @ up` added at each adapted kernel.

  The change of one kernel is formed on its own (never the whole model's at
  once), in float32, and added in the base leaf's dtype. Kernels the adapter
  does not name are returned unchanged.

  Args:
    base: the model the adapter was trained on.
    adapter: a pytree of `LoRA`s at some of the base's leaf paths.
    scale: a finite factor on every change (0 gives the base back).

  Raises:
    ValueError: a bad adapter, an adapted path that is not a leaf of the
      base, or factors whose (in, out) do not fit the kernel's shape (naming
      the path), or a non-finite scale.
  """
  leaves = _leaves(adapter, "adapter")
  scale = tv._check_scale(scale)
  base_leaves = tree.leaves_by_path(base)
  for path, lora in leaves:
    if path not in base_leaves:
      raise ValueError(f"adapter: {'/'.join(path)} is not a leaf of the base")
    shape = np.shape(base_leaves[path])
    sizes = (np.shape(lora.down)[0], np.shape(lora.up)[1])
    if len(shape) < 1 or (math.prod(shape[:-1]), shape[-1]) != sizes:
      raise ValueError(
          f"adapter: {'/'.join(path)}: (in, out) {sizes} does not fit the base's"
          f" {tuple(shape)}"
      )
  updates = {
      path: _apply_leaf(base_leaves[path], lora, jnp.float32(scale))
      for path, lora in leaves
  }
  return tree.replace_leaves(base, updates)


@jax.jit
def _sum_leaf(loras: list[LoRA], scales: jax.Array) -> LoRA:
  down = jnp.concatenate([l.down.astype(_factor_dtype(l.down)) for l in loras], axis=1)
  up = jnp.concatenate(
      [s * l.up.astype(_factor_dtype(l.up)) for s, l in zip(scales, loras)], axis=0
  )
  return LoRA(down, up)


def lora_sum(
    adapters: Sequence[PyTree], *, scale: float | Sequence[float] = 1.0
) -> PyTree:
  """Task arithmetic of adapters, exact: sum_i scale_i down_i @ up_i per leaf.

  The adapters' rank-1 units are concatenated: down = [down_1 | ... |
  down_N], up = [s_1 up_1; ...; s_N up_N], of rank r_1 + ... + r_N, so
  `down @ up` is the scaled sum without forming any in x out matrix
  (`lora_compress` brings the rank back down).

  Args:
    adapters: N >= 1 adapters of the same kernels (ranks may differ).
    scale: one float for every adapter, or N floats.

  Raises:
    ValueError: no adapter, bad or mismatched adapters (naming the adapter
      and path), or a wrong number of scales or a non-finite one.
  """
  leaves = _check_adapters(adapters, same_rank=False)
  scales = jnp.asarray(tv._model_scales(scale, len(leaves)))
  merged = [_sum_leaf([l[j][1] for l in leaves], scales) for j in range(len(leaves[0]))]
  return _rebuild(adapters[0], merged)


@functools.partial(jax.jit, static_argnums=1)
def _compress_leaf(lora: LoRA, rank: int) -> LoRA:
  dtype = jnp.promote_types(_factor_dtype(lora.down), _factor_dtype(lora.up))
  q_down, r_down = jnp.linalg.qr(lora.down.astype(dtype))
  q_up, r_up = jnp.linalg.qr(lora.up.astype(dtype).T)
  u, s, vt = jnp.linalg.svd(
      jnp.matmul(r_down, r_up.T, precision=HIGHEST), full_matrices=False
  )
  left = jnp.matmul(q_down, u, precision=HIGHEST)
  right = jnp.matmul(vt, q_up.T, precision=HIGHEST)
  return _balanced(left, s, right, rank)


def lora_compress(adapter: PyTree, rank: int) -> PyTree:
  """Each LoRA re-factored at `rank`: the truncated SVD of down @ up.

  With QR factorisations down = Q_d R_d (Q_d: [in, r]) and up^T = Q_u R_u
  (Q_u: [out, r]), down @ up = Q_d (R_d R_u^T) Q_u^T, so the SVD of the r x r
  core R_d R_u^T = U S V^T gives that of the product, (Q_d U) S (Q_u V)^T,
  without forming the in x out matrix. The result keeps the k = min(rank, r,
  in, out) largest singular values, split evenly, `down = Q_d U_k sqrt(S_k)`,
  `up = sqrt(S_k) (Q_u V_k)^T`, padded with zero units to exactly `rank`:
  the best rank-`rank` approximation of down @ up in Frobenius norm, and
  down @ up itself when rank >= r.

  Raises:
    ValueError: a bad adapter (naming the path), or a rank below 1.
  """
  leaves = _leaves(adapter, "adapter")
  rank = _check_rank(rank)
  return _rebuild(adapter, [_compress_leaf(lora, rank) for _, lora in leaves])


def _lloyd_step(
    units: jax.Array, centres: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One k-means (Lloyd) step: `(new centres f32[k, D], assignment int[M])`.

  Each unit goes to its nearest centre in squared Euclidean distance (the
  lowest index on ties); a centre becomes the mean of its units, and one with
  none stays where it was.
  """
  distances = (
      jnp.sum(units * units, axis=1)[:, None]
      - 2 * jnp.matmul(units, centres.T, precision=HIGHEST)
      + jnp.sum(centres * centres, axis=1)[None, :]
  )
  assignment = jnp.argmin(distances, axis=1).astype(jnp.int32)
  members = jax.nn.one_hot(assignment, centres.shape[0], dtype=units.dtype)
  counts = jnp.sum(members, axis=0)[:, None]
  sums = jnp.matmul(members.T, units, precision=HIGHEST)
  return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), centres), assignment


def _norm_rescale(
    units: jax.Array, centres: jax.Array, assignment: jax.Array
) -> jax.Array:
  """Each centre scaled to the mean norm of its units (LoRA-LEGO's parameter
  reweighting); a centre with no units, or of norm 0, is left as it is."""
  members = jax.nn.one_hot(assignment, centres.shape[0], dtype=units.dtype)
  counts = jnp.sum(members, axis=0)
  mean_norm = members.T @ jnp.linalg.norm(units, axis=1) / jnp.maximum(counts, 1)
  norm = jnp.linalg.norm(centres, axis=1)
  factor = jnp.where((counts > 0) & (norm > 0), mean_norm / jnp.where(norm > 0, norm, 1), 1)
  return centres * factor[:, None]


@functools.partial(jax.jit, static_argnums=2)
def _lego_leaf(
    loras: list[LoRA], key: jax.Array, rank: int, iterations: jax.Array, rescale: jax.Array
) -> LoRA:
  """LoRA-LEGO at one leaf: k-means over the units [down[:, j]; up[j]].

  `iterations` and `rescale` are traced, so one compilation serves them all.
  """
  units = jnp.concatenate(
      [jnp.concatenate([l.down.T, l.up], axis=1).astype(jnp.float32) for l in loras]
  )
  start = units[jnp.argsort(jax.random.uniform(key, units.shape[:1]))[:rank]]
  assignment = jnp.zeros(units.shape[0], jnp.int32)
  centres, assignment = jax.lax.fori_loop(
      0, iterations, lambda _, c: _lloyd_step(units, c[0]), (start, assignment)
  )
  centres = jnp.where(rescale, _norm_rescale(units, centres, assignment), centres)
  fan_in = loras[0].down.shape[0]
  return LoRA(centres[:, :fan_in].T, centres[:, fan_in:])


def lora_lego(
    adapters: Sequence[PyTree],
    rank: int,
    *,
    key: jax.Array,
    iterations: int = 20,
    rescale: bool = True,
) -> PyTree:
  """LoRA-LEGO: rank-wise clustering of the adapters' units into `rank` units.

  Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of
  LoRA to Extremes Through Rank-Wise Clustering" (arXiv 2409.16167, ICLR
  2025), Section 4. A LoRA's j-th rank-1 unit (a "minimal semantic unit",
  MSU) is the pair (down[:, j], up[j]); its change down[:, j] up[j] is
  independent of the other units (permutation invariance), and concatenating
  units sums their changes (concatenation-summation equivalence). At each
  adapted leaf, separately:

  1. Grouping: the M = r_1 + ... + r_N units of all adapters become vectors
     u = [down[:, j]; up[j]]: f32[M, in + out], in adapter order, then unit
     order, unnormalised.
  2. Clustering: k-means with k = `rank`, starting from k distinct units,
     those at `argsort(jax.random.uniform(leaf_key(key, 0, path), (M,)))[:k]`
     (a uniformly random k-subset), and running exactly `iterations` Lloyd
     steps (nearest centre in squared Euclidean distance, lowest index on
     ties; a centre becomes the mean of its units, an empty cluster keeps its
     centre).
  3. Reconstruction: centre c_j = [a_j; b_j] becomes the merged unit j,
     down[:, j] = a_j, up[j] = b_j, a LoRA of rank k.
  4. Parameter reweighting (`rescale`): averaging shrinks a centre's norm
     ("norm decay"), so each centre is scaled to the mean norm of its
     cluster's units. The paper's second, output reweighting (against the
     output variance of a wider merged rank) is a scalar on the change:
     pass it as `lora_apply`'s `scale`.

  With k = M (every cluster one unit) the result is the units of `lora_sum`
  reordered, so its product is exactly the adapters' sum.

  Args:
    adapters: N >= 1 adapters of the same kernels (ranks may differ).
    rank: k, the merged rank, at most the M units of every leaf.
    key: a JAX random key; the same key gives the same merge.
    iterations: the number of Lloyd steps, >= 1.
    rescale: the parameter reweighting of step 4.

  Returns:
    An adapter of rank `rank` at every leaf.

  Raises:
    ValueError: no adapter, bad or mismatched adapters (naming the adapter
      and path), a rank below 1 or above a leaf's number of units (naming
      the path), or fewer than one iteration.
  """
  leaves = _check_adapters(adapters, same_rank=False)
  rank = _check_rank(rank)
  iterations = _check_rank(iterations, "iterations")
  for j, (path, _) in enumerate(leaves[0]):
    units = sum(_rank(l[j][1]) for l in leaves)
    if rank > units:
      raise ValueError(f"rank {rank} is more than the {units} units of {'/'.join(path)}")
  merged = [
      _lego_leaf(
          [l[j][1] for l in leaves], tv.leaf_key(key, 0, path),
          rank, jnp.int32(iterations), jnp.bool_(rescale),
      )
      for j, (path, _) in enumerate(leaves[0])
  ]
  return _rebuild(adapters[0], merged)


@functools.partial(jax.jit, static_argnums=1)
def _reversible_leaf(loras: list[LoRA], num_basis: int) -> tuple[LoRA, jax.Array]:
  """The basis (p stacked LoRAs) and coefficients f32[N, p] of one leaf."""
  fan_in, rank = loras[0].down.shape
  tasks = jnp.stack([
      jnp.concatenate([l.down.ravel(), l.up.ravel()]).astype(jnp.float32)
      for l in loras
  ])
  u, s, vt = jnp.linalg.svd(tasks, full_matrices=False)
  k = min(num_basis, s.shape[0])
  basis = jnp.pad(s[:k, None] * vt[:k], ((0, num_basis - k), (0, 0)))
  coefficients = jnp.pad(u[:, :k], ((0, 0), (0, num_basis - k)))
  down = basis[:, : fan_in * rank].reshape(num_basis, fan_in, rank)
  up = basis[:, fan_in * rank :].reshape(num_basis, rank, -1)
  return LoRA(down, up), coefficients


def reversible_merge(adapters: Sequence[PyTree], num_basis: int) -> ReversibleMerge:
  """Reversible Model Merging: a shared basis, and each task's coefficients.

  Alipour and Amiri, "Towards Reversible Model Merging For Low-rank Weights"
  (arXiv 2510.14163, 2025). Instead of one merged adapter, RMM keeps p basis
  adapters per layer and, for each task, p coefficients that recombine them
  into that task's adapter. At each adapted leaf, separately: task t's
  factors, flattened and joined, are a row x_t = [vec(down_t); vec(up_t)] of
  X: f32[N, D], D = r (in + out). The basis and coefficients minimising the
  reconstruction error sum_t ||x_t - sum_j c_tj b_j||^2 in closed form are
  the top p singular directions of X = U S V^T (Eckart-Young):

      basis b_j = s_j v_j   (j < p),     coefficients c_tj = U[t, j],

  so c_t is also the least-squares solution for x_t on that (orthogonal)
  basis. Reconstruction recombines factors, not changes: down_t = sum_j c_tj
  down(b_j), up_t = sum_j c_tj up(b_j). With p >= rank(X) (p = N always
  suffices) every task is reconstructed exactly; a basis direction beyond
  min(N, D) is zero, with zero coefficients.

  This transcribes the paper's construction as its summaries state it (a
  closed-form optimal basis and task coefficients for a linear combination
  of low-rank factors); the published text's exact grouping of factor
  entries into vectors may differ.

  Args:
    adapters: N >= 1 adapters of the same kernels and, leaf by leaf, the same
      ranks (one per task, e.g. `lora_extract` of each fine-tune).
    num_basis: p >= 1, the basis size (the storage of p adapters).

  Returns:
    `ReversibleMerge(basis, coefficients)`; see `reversible_task`.

  Raises:
    ValueError: no adapter, bad or mismatched adapters, a rank that differs
      between adapters (naming the adapter and path), or p < 1.
  """
  leaves = _check_adapters(adapters, same_rank=True)
  num_basis = _check_rank(num_basis, "num_basis")
  merged = [
      _reversible_leaf([l[j][1] for l in leaves], num_basis)
      for j in range(len(leaves[0]))
  ]
  return ReversibleMerge(
      _rebuild(adapters[0], [basis for basis, _ in merged]),
      _rebuild(adapters[0], [c for _, c in merged]),
  )


@jax.jit
def _recombine(basis: LoRA, coefficients: jax.Array) -> LoRA:
  """sum_j c_j basis_j of one leaf's factors; coefficients: f32[p]."""
  return LoRA(
      jnp.tensordot(coefficients, basis.down, axes=1, precision=HIGHEST),
      jnp.tensordot(coefficients, basis.up, axes=1, precision=HIGHEST),
  )


def reversible_task(merged: ReversibleMerge, task: int) -> PyTree:
  """Task `task`'s adapter from a `reversible_merge`: sum_j c_tj basis_j.

  Raises:
    ValueError: a basis that is not stacked LoRAs, coefficients that do not
      match it (naming the path), or a task index out of range.
  """
  basis = jax.tree_util.tree_flatten_with_path(merged.basis, is_leaf=_is_lora)[0]
  try:
    coefficients = jax.tree.structure(merged.basis, is_leaf=_is_lora).flatten_up_to(
        merged.coefficients
    )
  except ValueError as e:
    raise ValueError(f"coefficients do not match the basis: {e}") from None
  for (path, b), c in zip(basis, coefficients):
    where = tree.path_str(path)
    if not _is_lora(b) or np.ndim(b.down) != 3 or np.ndim(b.up) != 3:
      raise ValueError(f"basis: {where}: not a LoRA of stacked [p, in, r], [p, r, out]")
    if np.ndim(c) != 2 or np.shape(c)[1] != np.shape(b.down)[0]:
      raise ValueError(
          f"coefficients: {where}: {np.shape(c)}, not [N, {np.shape(b.down)[0]}]"
      )
    if isinstance(task, bool) or not 0 <= task < np.shape(c)[0]:
      raise ValueError(f"task must be in [0, {np.shape(c)[0]}), got {task!r}")
  return _rebuild(
      merged.basis, [_recombine(b, jnp.asarray(c)[task]) for (_, b), c in zip(basis, coefficients)]
  )
