"""Expert merging in a sparse mixture of experts: M-SMoE, and MC-SMoE's low-rank + sparse compression.

    r = mj.stats.accumulate(mj.routing.routing_statistics(routing_fn, top_k=2), variables, batches)
    merged, groups = mj.merge.msmoe(variables["params"]["moe"], r, num_groups=4)
    small = mj.models.build("moe_mlp", num_experts=4, ...)   # the same model with 4 experts

M-SMoE (Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with
Hints from Its Routing Policy", ICLR; reference code UNITES-Lab/MC-SMoE):

1. **Dominant experts and groups** (`group_experts`): the `num_groups` most
   frequently routed experts are the dominant ones (ties: lower index); every
   other expert joins the dominant expert whose router logits are most
   similar to its own (cosine of the logit columns over the data,
   `RoutingStats.logit_similarity`; ties: the more frequent dominant).
2. **Alignment** (`align_experts`): each expert's hidden units are permuted
   onto its dominant's by one linear assignment per expert, on the weights
   (`<w_in columns> + b_in b_in' + <w_out rows>`) or on the correlation of
   their activations (`routing.expert_correlation`). The permutation of all
   experts is one int[E, h] of the block's batched group (one row per
   expert, dominant experts' rows the identity), applied by `permute`.
3. **Merge** (`merge_expert_groups`): each group's aligned experts averaged with
   weights proportional to their routing frequency (uniformly where a group
   was never routed to); the router's columns of a group become one: the
   same weighted mean of the members' kernel columns and biases, plus
   `log(group size)` on the bias, so the group's logit is the log-sum-exp of
   its members' logits when they are equal (duplicated experts with equal
   router rows merge to the same function under dense gating, k = E).

The result is the block with `num_groups` experts, in the order of the
dominant experts (most frequent first). MC-SMoE's compression
(`low_rank_sparse`, `compress_experts`) then stores each merged expert's
matrices as a rank-r SVD part plus the largest entries of the residual (the
paper prunes the two parts by importance during distillation; here they are
the one-shot closed form: the best rank-r approximation, Eckart-Young, and
the residual's top entries by magnitude).

Blocks follow the zoo MoE's layout (`mergejax.models.moe`): `router/kernel
f32[d, E]`, `router/bias f32[E]`, `w_in f32[E, d, h]`, `b_in f32[E, h]`,
`w_out f32[E, h, o]`, `b_out f32[E, o]`.
"""

from collections.abc import Mapping, Sequence
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.lap import lap as linear_assignment
from mergejax import permute
from mergejax import routing as routing_lib
from mergejax import spec as spec_lib
from mergejax import tree

Block = Mapping[str, Any]
HIGHEST = jax.lax.Precision.HIGHEST
_EXPERT_LEAVES = ("w_in", "b_in", "w_out", "b_out")


class ExpertGroups(NamedTuple):
  """Experts grouped around dominant ones.

  Attributes:
    labels: int32[E], each expert's group.
    dominants: int32[G], group g's dominant expert (most frequent first).
  """

  labels: np.ndarray
  dominants: np.ndarray


class LowRankSparse(NamedTuple):
  """`w ~ u @ v + sparse` (batched over leading axes).

  Attributes:
    u: f32[..., m, r].
    v: f32[..., r, n].
    sparse: f32[..., m, n], zero outside the kept entries.
  """

  u: jax.Array
  v: jax.Array
  sparse: jax.Array

  def dense(self) -> jax.Array:
    """f32[..., m, n], the reconstruction."""
    return jnp.matmul(self.u, self.v, precision=HIGHEST) + self.sparse


def check_block(block: Block, what: str) -> tuple[int, int, int, int]:
  """`(E, d, h, o)` of an MoE block in the zoo's layout.

  Raises:
    ValueError: naming the leaf, for a missing leaf, a shape that does not
      fit the others, or non-finite values.
  """
  missing = [k for k in _EXPERT_LEAVES if k not in block]
  if "router" not in block or not all(k in block["router"] for k in ("kernel", "bias")):
    missing += [f"router/{k}" for k in ("kernel", "bias") if k not in block.get("router", {})]
  if missing:
    raise ValueError(f"{what}: the MoE block lacks {missing} (layout: router/kernel, router/bias, "
                     f"{', '.join(_EXPERT_LEAVES)})")
  w_in = np.shape(block["w_in"])
  if len(w_in) != 3:
    raise ValueError(f"{what}: w_in must be f32[E, d, h], got shape {w_in}")
  e, d, h = w_in
  o = np.shape(block["w_out"])[-1] if np.ndim(block["w_out"]) == 3 else -1
  want = {"b_in": (e, h), "w_out": (e, h, o), "b_out": (e, o), "router/kernel": (d, e), "router/bias": (e,)}
  for name, shape in want.items():
    leaf = block["router"][name[7:]] if name.startswith("router/") else block[name]
    if np.shape(leaf) != shape:
      raise ValueError(f"{what}: {name} has shape {np.shape(leaf)}, expected {shape} (E={e}, d={d}, h={h})")
  tree.check_finite(block)
  return e, d, h, o


def block_spec(num_experts: int, hidden: int) -> spec_lib.PermutationSpec:
  """The block's batched group `experts`: each expert's h hidden units, one permutation per expert."""
  refs = [spec_lib.AxisRef(("w_in",), 2, batch=0), spec_lib.AxisRef(("b_in",), 1, batch=0),
          spec_lib.AxisRef(("w_out",), 1, batch=0)]
  return spec_lib.PermutationSpec({"experts": refs}, {"experts": hidden}, {"experts": num_experts})


def _check_vector(name: str, value, e: int, what: str) -> np.ndarray:
  value = np.asarray(value, np.float64)
  if value.shape != (e,) or not np.isfinite(value).all() or (value < 0).any():
    raise ValueError(f"{what}: {name} must be {e} finite non-negative values, got shape {value.shape}")
  return value


def group_experts(frequency, similarity, num_groups: int) -> ExpertGroups:
  """M-SMoE's grouping: the `num_groups` most used experts lead, the rest join the most similar leader.

  Args:
    frequency: f32[E], routing frequency (`RoutingStats.frequency`).
    similarity: f32[E, E], e.g. `RoutingStats.logit_similarity`.
    num_groups: G, 1 <= G <= E.

  Returns:
    ExpertGroups: dominants the G most frequent (ties: lower index), most
    frequent first; each other expert labelled with the group of its most
    similar dominant (ties: the earlier group).

  Raises:
    ValueError: for a bad `num_groups`, shapes that disagree, or values that
      are not finite.
  """
  frequency = np.asarray(frequency, np.float64)
  e = frequency.shape[0] if frequency.ndim == 1 else -1
  frequency = _check_vector("frequency", frequency, e, "group_experts")
  similarity = np.asarray(similarity, np.float64)
  if similarity.shape != (e, e) or not np.isfinite(similarity).all():
    raise ValueError(f"group_experts: similarity must be finite f32[{e}, {e}], got shape {similarity.shape}")
  if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or not 1 <= num_groups <= e:
    raise ValueError(f"group_experts: num_groups must be an int in [1, {e}], got {num_groups!r}")
  dominants = np.argsort(-frequency, kind="stable")[:num_groups]
  labels = np.argmax(similarity[:, dominants], axis=1)
  labels[dominants] = np.arange(num_groups)
  return ExpertGroups(labels.astype(np.int32), dominants.astype(np.int32))


def _check_groups(groups: ExpertGroups, e: int, what: str) -> ExpertGroups:
  labels, dominants = np.asarray(groups.labels), np.asarray(groups.dominants)
  g = dominants.shape[0] if dominants.ndim == 1 else 0
  if labels.shape != (e,) or g < 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 \
     or labels.max() >= g:
    raise ValueError(f"{what}: groups.labels must be {e} ints in [0, {g}), got {labels!r}")
  if (not np.issubdtype(dominants.dtype, np.integer) or dominants.min() < 0 or dominants.max() >= e
      or (labels[dominants] != np.arange(g)).any()):
    raise ValueError(f"{what}: groups.dominants {dominants!r} must be experts in [0, {e}), dominant g in group g")
  return ExpertGroups(labels, dominants)


@jax.jit
def _pair_costs(block: Block) -> jax.Array:
  """f32[E, E, h, h]: the weight similarity of expert i's unit a and expert j's unit b."""
  return (jnp.einsum("ida,jdb->ijab", block["w_in"], block["w_in"], precision=HIGHEST)
          + jnp.einsum("ia,jb->ijab", block["b_in"], block["b_in"], precision=HIGHEST)
          + jnp.einsum("iao,jbo->ijab", block["w_out"], block["w_out"], precision=HIGHEST))


def align_experts(block: Block, groups: ExpertGroups, *, matching: str = "weight",
                  routing: routing_lib.RoutingStats | None = None, lap_method: str = "auto"
                  ) -> tuple[dict[str, Any], jax.Array]:
  """Each expert's hidden units permuted onto its group's dominant expert.

  Args:
    block: an MoE block (module docstring).
    groups: from `group_experts`.
    matching: "weight" (inner products of the units' weights) or
      "activation" (correlation of their activations, from `routing`
      accumulated with `activations=True`).
    routing: the routing statistics, for "activation".
    lap_method: as `mj.lap`.

  Returns:
    `(aligned block, perm int32[E, h])`: `perm[e]` maps the dominant's unit i
    to expert e's unit `perm[e][i]` (identity for dominants); the block's
    other leaves are unchanged. Each expert computes what it did.

  Raises:
    ValueError: for a bad block, groups or matching, or "activation" without
      hidden moments.
  """
  e, _, h, _ = check_block(block, "align_experts")
  groups = _check_groups(groups, e, "align_experts")
  if matching not in ("weight", "activation"):
    raise ValueError(f"align_experts: matching must be 'weight' or 'activation', got {matching!r}")
  if matching == "activation":
    if routing is None:
      raise ValueError("align_experts: matching='activation' needs routing statistics with activations")
    scores = routing_lib.expert_correlation(routing)
    if scores.shape != (e, e, h, h):
      raise ValueError(f"align_experts: the routing statistics' hidden moments are for {scores.shape[:3]}"
                       f" (E, E, h), the block has ({e}, {e}, {h})")
  else:
    scores = _pair_costs({k: block[k] for k in ("w_in", "b_in", "w_out")})
  dominant_of = groups.dominants[groups.labels]  # int[E]
  cost = scores[dominant_of, np.arange(e)]  # f32[E, h, h]: the dominant's units x expert e's
  perm = linear_assignment(cost, maximize=True, method=lap_method)
  is_dominant = np.zeros(e, bool)
  is_dominant[groups.dominants] = True
  perm = jnp.where(is_dominant[:, None], jnp.arange(h, dtype=perm.dtype), perm)
  spec = block_spec(e, h)
  experts = permute.apply_permutation(spec, {"experts": perm}, {k: block[k] for k in ("w_in", "b_in", "w_out")})
  return {**block, **experts}, perm


def merge_expert_groups(block: Block, groups: ExpertGroups, weights=None) -> dict[str, Any]:
  """Each group's experts averaged into one (weighted), and their router columns combined.

  Args:
    block: an MoE block, its experts aligned within each group.
    groups: from `group_experts`.
    weights: f32[E] non-negative (routing frequencies: M-SMoE), normalised
      within each group; a group whose weights sum to 0 is averaged
      uniformly. None: uniform.

  Returns:
    The block with G experts (group order): expert g the weighted mean of
    group g's experts' `w_in, b_in, w_out, b_out`; router column g the same
    weighted mean of the members' columns and biases, plus `log(size of
    group g)` on the bias (module docstring). Leaves keep their dtypes.

  Raises:
    ValueError: for a bad block, groups or weights.
  """
  e, _, _, _ = check_block(block, "merge_expert_groups")
  groups = _check_groups(groups, e, "merge_expert_groups")
  w = np.ones(e) if weights is None else _check_vector("weights", weights, e, "merge_expert_groups")
  g = groups.dominants.shape[0]
  onehot = np.eye(g)[groups.labels].T  # f64[G, E]
  mass = onehot @ w
  coef = np.where(mass[:, None] > 0, onehot * w / np.where(mass > 0, mass, 1.0)[:, None],
                  onehot / onehot.sum(1, keepdims=True))  # f64[G, E], rows sum to 1
  return _mix_groups(block, jnp.asarray(coef, jnp.float32), jnp.asarray(np.log(onehot.sum(1)), jnp.float32))


@jax.jit
def _mix_groups(block: Block, coef: jax.Array, log_sizes: jax.Array) -> dict[str, Any]:
  """coef f32[G, E] (rows sum to 1), log_sizes f32[G]: the merged block (`merge_expert_groups`)."""

  def mix(leaf, axis=0):
    out = jnp.tensordot(coef, jnp.moveaxis(leaf.astype(jnp.float32), axis, 0), axes=1, precision=HIGHEST)
    return jnp.moveaxis(out, 0, axis).astype(leaf.dtype)

  router = block["router"]
  out = {**block, **{k: mix(block[k]) for k in _EXPERT_LEAVES}}
  out["router"] = {**router, "kernel": mix(router["kernel"], axis=1),
                   "bias": (mix(router["bias"]) + log_sizes).astype(router["bias"].dtype)}
  return out


def select_experts(block: Block, keep: Sequence[int]) -> dict[str, Any]:
  """The block with only the experts `keep` (in that order), their router columns too (expert pruning).

  Raises:
    ValueError: for a bad block, or `keep` empty, repeated or out of range.
  """
  e, _, _, _ = check_block(block, "select_experts")
  keep = np.asarray(keep)
  if (keep.ndim != 1 or keep.size == 0 or not np.issubdtype(keep.dtype, np.integer) or keep.min() < 0
      or keep.max() >= e or len(set(keep.tolist())) != keep.size):
    raise ValueError(f"select_experts: keep must be distinct experts in [0, {e}), got {keep!r}")
  return _take_experts(block, jnp.asarray(keep, jnp.int32))


@jax.jit
def _take_experts(block: Block, keep: jax.Array) -> dict[str, Any]:
  out = {**block, **{k: jnp.take(block[k], keep, axis=0) for k in _EXPERT_LEAVES}}
  router = block["router"]
  out["router"] = {**router, "kernel": jnp.take(router["kernel"], keep, axis=1),
                   "bias": jnp.take(router["bias"], keep, axis=0)}
  return out


def msmoe(block: Block, routing: routing_lib.RoutingStats, num_groups: int, *, matching: str = "weight",
          lap_method: str = "auto") -> tuple[dict[str, Any], ExpertGroups]:
  """M-SMoE: group around dominant experts, align each expert to its dominant, frequency-weighted merge.

  Args:
    block: an MoE block (module docstring).
    routing: its `RoutingStats` on the merge data (`routing_statistics`;
      with `activations=True` for `matching="activation"`).
    num_groups: the experts of the result, 1 <= num_groups <= E.
    matching: "weight", "activation" or "none" (no alignment).
    lap_method: as `mj.lap`.

  Returns:
    `(merged block with num_groups experts, ExpertGroups)`.

  Raises:
    ValueError: before any work, for a bad block, routing statistics of
      another number of experts, a bad `num_groups` or `matching`.
  """
  e, _, _, _ = check_block(block, "msmoe")
  if np.shape(routing.frequency) != (e,):
    raise ValueError(f"msmoe: the routing statistics are for {np.shape(routing.frequency)[0]} experts,"
                     f" the block has {e}")
  if matching not in ("weight", "activation", "none"):
    raise ValueError(f"msmoe: matching must be 'weight', 'activation' or 'none', got {matching!r}")
  groups = group_experts(routing.frequency, routing.logit_similarity, num_groups)
  if matching != "none":
    block, _ = align_experts(block, groups, matching=matching, routing=routing, lap_method=lap_method)
  return merge_expert_groups(block, groups, routing.frequency), groups


def low_rank_sparse(w, rank: int, density: float = 0.0) -> LowRankSparse:
  """`w ~ u v + s`: the best rank-r part (SVD) plus the residual's largest entries.

  Args:
    w: f32[..., m, n] (leading axes: e.g. experts).
    rank: r, 0 <= r <= min(m, n).
    density: the fraction of each matrix's m n entries kept in `s` (the
      largest of `w - u v` by magnitude; `round(density m n)` of them), in [0, 1].

  Returns:
    LowRankSparse with u f32[..., m, r] (the singular vectors scaled by the
    singular values), v f32[..., r, n], sparse f32[..., m, n].

  Raises:
    ValueError: for `w` of rank < 2 or not finite, a bad rank or density.
  """
  w = jnp.asarray(w, jnp.float32)
  if w.ndim < 2 or not bool(jnp.isfinite(w).all()):
    raise ValueError(f"low_rank_sparse: w must be finite f32[..., m, n], got shape {w.shape}")
  m, n = w.shape[-2:]
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank <= min(m, n):
    raise ValueError(f"low_rank_sparse: rank must be an int in [0, {min(m, n)}], got {rank!r}")
  if not 0.0 <= density <= 1.0:
    raise ValueError(f"low_rank_sparse: density must be in [0, 1], got {density!r}")
  u, v, sparse = _low_rank_sparse(w, jnp.int32(rank), int(round(density * m * n)))
  return LowRankSparse(u[..., :rank], v[..., :rank, :], sparse)


@functools.partial(jax.jit, static_argnums=2)
def _low_rank_sparse(w: jax.Array, rank: jax.Array, keep: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The scaled singular vectors (all of them, those past `rank` zeroed), and the sparse part.

  `rank` is traced, so every rank shares one compilation per shape and `keep`.
  """
  m, n = w.shape[-2:]
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  u = u * jnp.where(jnp.arange(s.shape[-1]) < rank, s, 0.0)[..., None, :]
  residual = w - jnp.matmul(u, vt, precision=HIGHEST)
  if keep == 0:
    return u, vt, jnp.zeros_like(w)
  flat = jnp.abs(residual).reshape(-1, m * n)
  _, index = jax.lax.top_k(flat, keep)
  mask = jax.vmap(lambda i: jnp.zeros(m * n, w.dtype).at[i].set(1.0))(index)
  return u, vt, residual * mask.reshape(w.shape)


def compress_experts(block: Block, rank: int, density: float = 0.0) -> tuple[dict[str, Any], dict[str, int]]:
  """MC-SMoE's compression of every expert's `w_in` and `w_out` as low rank + sparse.

  Args:
    block: an MoE block (merged or not).
    rank, density: as `low_rank_sparse`, for every expert matrix.

  Returns:
    `(block with w_in, w_out replaced by their reconstructions, sizes)`:
    sizes `{"dense": entries of w_in and w_out, "compressed": r (m + n) plus
    kept entries, summed over experts}`.

  Raises:
    ValueError: for a bad block, rank or density.
  """
  e, d, h, o = check_block(block, "compress_experts")
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank <= min(d, h, o):
    raise ValueError(f"compress_experts: rank must be an int in [0, {min(d, h, o)}], got {rank!r}")
  out, dense, compressed = dict(block), 0, 0
  for k in ("w_in", "w_out"):
    parts = low_rank_sparse(block[k], rank, density)
    m, n = np.shape(block[k])[1:]
    out[k] = parts.dense().astype(jnp.asarray(block[k]).dtype)
    dense += e * m * n
    compressed += e * (rank * (m + n) + int(round(density * m * n)))
  return out, {"dense": dense, "compressed": compressed}
