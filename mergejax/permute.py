"""Applying, inverting and composing permutations over whole variable trees.

    perm = random_permutation(spec, key)             # {group: int32[n]}
    permuted = apply_permutation(spec, perm, variables)
    apply_permutation(spec, invert_permutation(perm), permuted)   # == variables

Permutations are gathers (DESIGN.md): for every AxisRef of group g,
`take(leaf, perm[g], axis)` (for a factored axis, along its component of the
view), so B's unit `perm[g][i]` lands on A's unit i. A permutation is a dict
`{group: int[n]}` over exactly the spec's groups; a batched group's (stacked
copies, `spec.batch_sizes[g] = L`) is int[L, n], row l permuting copy l.
"""

from collections.abc import Callable
from collections.abc import Mapping
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import spec as spec_lib
from mergejax import tree

PyTree = Any
Perm = dict[str, jax.Array]


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def take_units(x: jax.Array, perm: jax.Array, ref: spec_lib.AxisRef) -> jax.Array:
  """`x` with the units of `ref`'s axis (or axis component) gathered by `perm`.

  Args:
    x: the leaf `ref` points at, any shape and dtype.
    perm: int[n], the units' new order: unit i of the result is unit
      `perm[i]` of `x`; int[L, n] for a ref with a batch axis (row l gathers
      copy l, the leaf indexed l on `ref.batch`).
    ref: the axis; with a factor `(view, index)` the axis is reshaped to
      `view`, gathered along component `index`, and reshaped back; with a
      part `(start, stop)` only those units are gathered (the factor views
      them), the others stay.

  Returns:
    An array of `x`'s shape and dtype (a NumPy array when `x` is one and
    `perm` is concrete, so NumPy dtypes such as float64 are kept).
  """
  xp = np if isinstance(x, np.ndarray) and not _is_traced(perm) else jnp
  perm = np.asarray(perm) if xp is np else perm
  if ref.batch is not None:
    copy = ref._replace(axis=ref.axis - (ref.axis > ref.batch), batch=None)
    index = lambda l: (slice(None),) * ref.batch + (l,)  # noqa: E731
    return xp.stack([take_units(x[index(l)], perm[l], copy) for l in range(x.shape[ref.batch])], axis=ref.batch)
  if ref.part is not None:
    start, stop = ref.part
    cut = lambda a, b: x[(slice(None),) * ref.axis + (slice(a, b),)]
    inside = take_units(cut(start, stop), perm, ref._replace(part=None))
    return xp.concatenate([cut(0, start), inside, cut(stop, None)], axis=ref.axis)
  if ref.factor is None:
    return xp.take(x, perm, axis=ref.axis)
  view, index = ref.factor
  shape = x.shape
  viewed = xp.reshape(x, shape[:ref.axis] + tuple(view) + shape[ref.axis + 1:])
  return xp.reshape(xp.take(viewed, perm, axis=ref.axis + index), shape)


def check_permutation(spec: spec_lib.PermutationSpec, perm: Mapping[str, Any]) -> None:
  """Raises ValueError unless `perm` holds one permutation per group of `spec`.

  `perm` must name exactly the spec's groups, and each `perm[g]` must be an
  integer array of shape `(sizes[g],)`, or `(batch_sizes[g], sizes[g])` for
  a batched group. Concrete values must be permutations of
  `range(sizes[g])` (each row); traced ones (under jit) are checked by shape
  and dtype only.

  Raises:
    ValueError: naming the missing or unknown groups, or the group whose
      permutation is wrong.
  """
  if not isinstance(perm, Mapping):
    raise ValueError(f"a permutation is a dict {{group: int[n]}}, got {type(perm).__name__}")
  missing, unknown = sorted(set(spec.groups) - set(perm)), sorted(set(perm) - set(spec.groups))
  if missing or unknown:
    raise ValueError(f"permutation: missing groups {missing}, unknown groups {unknown}")
  for g in spec.groups:
    p, n = perm[g], spec.sizes[g]
    want = (n,) if g not in spec.batch_sizes else (spec.batch_sizes[g], n)
    shape, dtype = tuple(np.shape(p)), jnp.result_type(p)
    if shape != want or not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"permutation of group {g!r}: expected int{list(want)}, got {dtype}{list(shape)}")
    if not _is_traced(p) and not np.array_equal(np.sort(np.asarray(p), axis=-1),
                                                np.broadcast_to(np.arange(n), want)):
      raise ValueError(f"permutation of group {g!r} is not a permutation of range({n})"
                       + (" in every row" if len(want) == 2 else ""))


def apply_permutation(spec: spec_lib.PermutationSpec, perm: Mapping[str, Any], variables: PyTree) -> PyTree:
  """`variables` with every group's axes gathered by `perm[group]`.

  For every group g and each of its AxisRefs, the leaf becomes
  `take(leaf, perm[g], axis)` (along the factor's component for a factored
  axis): unit i of the result is unit `perm[g][i]` of `variables`. With `va`
  and `vb` two models and `perm` matching B's units to A's, the result is B
  aligned to A, computing the same function as B.

  Works under `jax.jit` (traced permutations are checked by shape and dtype).

  Args:
    spec: the groups; it must fit `variables` (`spec.check_spec`).
    perm: group -> int[n], a permutation of range(n), for exactly the spec's
      groups; int[L, n] for a batched group (row l permutes copy l of each
      member).
    variables: the tree to permute (arrays of any dtype, kept).

  Returns:
    A tree of the same structure, shapes and dtypes; leaves no group touches
    are the same objects.

  Raises:
    ValueError: before any work, for a bad permutation (`check_permutation`)
      or a spec that does not fit `variables` (`spec.check_spec`).
  """
  check_permutation(spec, perm)
  spec_lib.check_spec(spec, variables)
  leaves = tree.leaves_by_path(variables)
  on_host = ({p for p, x in leaves.items() if isinstance(x, jax.Array) and tree.in_host_memory(x)}
             if not any(_is_traced(p) for p in jax.tree.leaves(perm)) else set())
  updates = {}
  for g, refs in spec.groups.items():
    for ref in refs:
      x = updates.get(ref.path, np.asarray(leaves[ref.path]) if ref.path in on_host else leaves[ref.path])
      updates[ref.path] = _take_keeping_sharding(x, _host_copy(perm[g]) if ref.path in on_host else perm[g], ref)
  return tree.replace_leaves(variables, {p: jax.device_put(x, leaves[p].sharding) if p in on_host else x
                                         for p, x in updates.items()})



def _take_keeping_sharding(x: Any, perm: Any, ref: spec_lib.AxisRef) -> Any:
  """`take_units`, compiled to keep x's `NamedSharding`; as is for other leaves.

  A leaf whose permuted axis is not sharded is gathered shard by shard. One
  whose (plain) permuted axis is sharded, with a concrete permutation, is
  permuted by `_take_sharded_axis` (only the rows that change devices move);
  a factored, part or batched ref on a sharded axis, or a traced permutation,
  falls back to XLA's gather, which all-gathers the leaf (DESIGN.md).
  """
  sharding = getattr(x, "sharding", None)
  if _is_traced(x) or not isinstance(sharding, jax.sharding.NamedSharding):
    return take_units(x, perm, ref)
  mesh_axes = _sharded_over(sharding, ref.axis)
  if (mesh_axes and not _is_traced(perm) and ref.factor is None and ref.part is None and ref.batch is None
      and x.shape[ref.axis] % _mesh_size(sharding.mesh, mesh_axes) == 0):
    return _take_sharded_axis(x, _host_copy(perm), ref.axis, mesh_axes)
  return jax.jit(take_units, static_argnums=2, out_shardings=sharding)(x, perm, ref)


def _sharded_over(sharding: jax.sharding.NamedSharding, axis: int) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that `axis` of a leaf laid out by `sharding` is split over."""
  spec = tuple(sharding.spec) + (None,) * (axis + 1 - len(sharding.spec))
  names = spec[axis] if isinstance(spec[axis], tuple) else () if spec[axis] is None else (spec[axis],)
  return tuple(n for n in names if sharding.mesh.shape[n] > 1)


def _mesh_size(mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> int:
  return int(np.prod([mesh.shape[a] for a in axes]))


def _host_copy(perm: Any) -> np.ndarray:
  """A concrete permutation on the host (a global replicated array: this process's copy)."""
  if isinstance(perm, jax.Array) and not perm.is_fully_addressable:
    perm = perm.addressable_data(0)
  return np.asarray(perm)


def _sharded_plan(perm: np.ndarray, shards: int) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
  """Which rows each shard sends where, for `out[i] = x[perm[i]]` over `shards` equal blocks.

  Round s moves rows from shard d to shard (d + s) % shards; `sizes[s]` is the
  most rows any shard sends in it (rounds with none are skipped).

  Returns:
    (shifts, sends: int32[shards, total], places: int32[shards, total]):
    `total = sum(sizes)` slots, round by round; shard d sends its local rows
    `sends[d]` (padding: row 0) and the shard receiving round s's slots from
    shard d - s writes them at its local rows `places[d]` (padding: `block`,
    dropped). Static: the shifts and the rounds' sizes.
  """
  n = perm.shape[0]
  block = n // shards
  dest = np.arange(n)
  source_shard, target_shard = perm // block, dest // block
  shift = (target_shard - source_shard) % shards
  shifts, sizes, sends, places = [], [], [], []
  for s in range(shards):
    chosen = shift == s
    if not chosen.any():
      continue
    counts = np.bincount(source_shard[chosen], minlength=shards)
    size = int(counts.max())
    send = np.zeros((shards, size), np.int32)
    place = np.full((shards, size), block, np.int32)
    for d in range(shards):
      rows = np.flatnonzero(chosen & (source_shard == d))  # output rows fed by shard d in round s
      send[d, :rows.size] = perm[rows] % block
      place[(d + s) % shards, :rows.size] = rows % block
    shifts.append(s)
    sizes.append(size)
    sends.append(send)
    places.append(place)
  return tuple(zip(shifts, sizes)), np.concatenate(sends, axis=1), np.concatenate(places, axis=1)


def _take_sharded_axis(x: jax.Array, perm: np.ndarray, axis: int, mesh_axes: tuple[str, ...]) -> jax.Array:
  """`take(x, perm, axis)` where `axis` is split over `mesh_axes`, keeping x's sharding.

  Under `shard_map`, each shard gathers the rows it keeps and, round by round
  (`_sharded_plan`), `ppermute`s to another shard just the rows that shard
  needs (padded to the round's largest count): no device holds more than its
  shard plus one round's rows, and no all-gather is compiled.
  """
  sharding = x.sharding
  shards = _mesh_size(sharding.mesh, mesh_axes)
  rounds, sends, places = _sharded_plan(perm, shards)
  index_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(mesh_axes))
  as_global = lambda a: jax.make_array_from_callback(a.shape, index_sharding, lambda i: a[i])  # noqa: E731
  run = _sharded_take(sharding, axis, mesh_axes, rounds)
  return run(x, as_global(sends), as_global(places))


@functools.lru_cache(maxsize=64)
def _sharded_take(sharding: jax.sharding.NamedSharding, axis: int, mesh_axes: tuple[str, ...],
                  rounds: tuple[tuple[int, int], ...]) -> Callable[..., jax.Array]:
  """The compiled permutation of `_take_sharded_axis`, one per layout and rounds."""
  shards = _mesh_size(sharding.mesh, mesh_axes)
  name = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
  spec = jax.sharding.PartitionSpec

  def local(x, sends, places):  # x: this shard; sends, places: int32[1, total]
    rows = jnp.moveaxis(x, axis, 0)
    out = jnp.zeros_like(rows)
    offset = 0
    for shift, size in rounds:
      send, place = sends[0, offset:offset + size], places[0, offset:offset + size]
      moved = jnp.take(rows, send, axis=0)
      if shift:
        moved = jax.lax.ppermute(moved, name, [(d, (d + shift) % shards) for d in range(shards)])
      out = out.at[place].set(moved, mode="drop")
      offset += size
    return jnp.moveaxis(out, 0, axis)

  mapped = jax.shard_map(local, mesh=sharding.mesh, in_specs=(sharding.spec, spec(mesh_axes), spec(mesh_axes)),
                         out_specs=sharding.spec)
  return jax.jit(mapped, out_shardings=sharding)


def identity_permutation(spec: spec_lib.PermutationSpec) -> Perm:
  """`{group: arange(n)}` (`[L, n]`, every row arange(n), for a batched group): changes nothing."""
  return {g: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), _shape(spec, g)) for g, n in spec.sizes.items()}


def _shape(spec: spec_lib.PermutationSpec, g: str) -> tuple[int, ...]:
  n = spec.sizes[g]
  return (n,) if g not in spec.batch_sizes else (spec.batch_sizes[g], n)


def invert_permutation(perm: Mapping[str, Any]) -> Perm:
  """The permutation that undoes `perm`, group by group.

  `invert(p)[g][p[g][i]] == i`, so `apply(invert(p), apply(p, v)) == v` and
  `apply(p, apply(invert(p), v)) == v`. Jittable.

  Args:
    perm: group -> int[n], a permutation of range(n) (or int[L, n], one per row).

  Returns:
    group -> int32 of the same shape.
  """
  return {g: jnp.argsort(jnp.asarray(p), axis=-1).astype(jnp.int32) for g, p in perm.items()}


def compose_permutations(first: Mapping[str, Any], second: Mapping[str, Any]) -> Perm:
  """The permutation that applies `first`, then `second`.

  `compose(p, q)[g] == p[g][q[g]]` (row by row for a batched group's
  int[L, n]), so for any spec and variables
  `apply(compose(p, q), v) == apply(q, apply(p, v))`. (Gathers compose in
  this order: unit i after both is unit `q[i]` after `p`, which is unit
  `p[q[i]]` of `v`.) Jittable.

  Args:
    first, second: group -> int[n] (or int[L, n]), over the same groups and shapes.

  Returns:
    group -> int32 of the same shape, in `first`'s group order.

  Raises:
    ValueError: naming the groups or the group whose sizes differ.
  """
  if set(first) != set(second):
    raise ValueError(f"compose: the permutations' groups differ: {sorted(set(first) ^ set(second))}")
  for g in first:
    if np.shape(first[g]) != np.shape(second[g]):
      raise ValueError(
          f"compose: group {g!r} has shape {np.shape(first[g])} in the first permutation and"
          f" {np.shape(second[g])} in the second"
      )
  return {g: jnp.take_along_axis(jnp.asarray(first[g]), jnp.asarray(second[g]), axis=-1).astype(jnp.int32)
          for g in first}


def random_permutation(spec: spec_lib.PermutationSpec, key: jax.Array) -> Perm:
  """One uniformly random permutation per group, deterministic given `key`.

  Args:
    spec: the groups and their sizes.
    key: a `jax.random` key; group i (in `spec.groups` order) uses the i-th
      key of `jax.random.split(key, len(groups))`; a batched group's row l
      the l-th key of that key split in L.

  Returns:
    group -> int32[n] (int32[L, n] for a batched group).
  """
  keys = jax.random.split(key, max(len(spec.sizes), 1))
  out = {}
  for k, (g, n) in zip(keys, spec.sizes.items()):
    if g in spec.batch_sizes:
      rows = [jax.random.permutation(c, n) for c in jax.random.split(k, spec.batch_sizes[g])]
      out[g] = jnp.stack(rows).astype(jnp.int32)
    else:
      out[g] = jax.random.permutation(k, n).astype(jnp.int32)
  return out
