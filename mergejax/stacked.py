"""Stacked copies and batched groups: one mapping to the same model unrolled.

A batched group (`PermutationSpec.batch_sizes`) permutes L stacked copies of
its variables (the layers of a scanned stack, a mixture's experts), each by a
row of its int[L, n] permutation. Cutting every stacked leaf into its copies
turns it into an ordinary spec, with one group per copy:

    flat_spec, flat = unstack(spec, variables)   # a stacked leaf -> a list of its L copies
    flat_perm = unstack_permutation(spec, perm)  # {"mlp[0]": perm["mlp"][0], ...}
    apply_permutation(flat_spec, flat_perm, flat) == unstack(spec, apply_permutation(spec, perm, variables))[1]
    stack(spec, flat) == variables;  stack_permutation(spec, flat_perm) == perm

Copy l of the leaf at `path` (stacked on axis b) is the leaf at
`path + (str(l),)`, the variable indexed l on axis b; its axes are the
stacked leaf's without b. Copy l of batched group g is the ordinary group
`copy_name(g, l)` = `"g[l]"`; an ordinary group's refs on a stacked leaf
become one ref per copy in that same group. The flat spec lists the ordinary
groups in the spec's order, then copy 0's groups, copy 1's, ... (each in the
spec's order): for a zoo LM, the unrolled model's order (`embed`, then
block 0's, block 1's ...).

Leaves that no batched group names (a stacked norm scale whose only group is
the residual stream) stay whole unless `stacked` names them.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import spec as spec_lib
from mergejax import tree

PyTree = Any
Path = tuple[str, ...]


def copy_name(group: str, index: int) -> str:
  """The ordinary group of copy `index` of batched group `group`: `"group[index]"`."""
  return f"{group}[{index}]"


def stacked_leaves(spec: spec_lib.PermutationSpec,
                   stacked: Mapping[Path | str, int] | None = None) -> dict[Path, int]:
  """`{path: batch axis}` of every leaf a batched group names, and of `stacked`'s.

  Raises:
    ValueError: naming the leaf, where two batch axes are given for one leaf.
  """
  out: dict[Path, int] = {}
  extra = {(tuple(p.split("/")) if isinstance(p, str) else tuple(p)): a for p, a in (stacked or {}).items()}
  named = [(r.path, r.batch, f"group {g!r}") for g, refs in spec.groups.items() for r in refs if r.batch is not None]
  for path, axis, who in named + [(p, a, "stacked") for p, a in extra.items()]:
    if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
      raise ValueError(f"{tree.path_str(path)}: a batch axis is a non-negative int, got {axis!r} ({who})")
    if out.setdefault(path, axis) != axis:
      raise ValueError(f"{tree.path_str(path)} has copies on axis {out[path]} and on axis {axis} ({who})")
  return out


def _copy_ref(ref: spec_lib.AxisRef, index: int, batch: int) -> spec_lib.AxisRef:
  return ref._replace(path=ref.path + (str(index),), axis=ref.axis - (ref.axis > batch), batch=None)


def unstack(
    spec: spec_lib.PermutationSpec, variables: PyTree, *, stacked: Mapping[Path | str, int] | None = None
) -> tuple[spec_lib.PermutationSpec, PyTree]:
  """The spec and variables with every stacked leaf cut into its copies.

  Args:
    spec: a spec that fits `variables` (`check_spec`), batched or not.
    variables: the stacked model's variables.
    stacked: more leaves to cut, `{path (key tuple or "a/b/c"): batch axis}`
      (e.g. every leaf of a scanned stack, so the paths follow the unrolled
      model's); the leaves of batched refs are always cut.

  Returns:
    `(flat_spec, flat_variables)`: an ordinary spec (groups `copy_name(g, l)`
    for each batched group g and copy l, the ordinary groups as they are),
    and `variables` with each stacked leaf replaced by the list of its
    copies (leaf paths `path + (str(l),)`).

  Raises:
    ValueError: naming the leaf or group: a spec that does not fit, a leaf
      of `stacked` that is not in `variables` or lacks the axis, an
      ordinary group that permutes a batch axis, or a copy's group name that
      the spec already uses.
  """
  spec_lib.check_spec(spec, variables)
  cut = stacked_leaves(spec, stacked)
  leaves = tree.leaves_by_path(variables)
  for path, axis in cut.items():
    if path not in leaves:
      raise ValueError(f"unstack: no variable {tree.path_str(path)}")
    if axis >= np.ndim(leaves[path]):
      raise ValueError(f"unstack: {tree.path_str(path)} has no axis {axis} (shape {np.shape(leaves[path])})")
  counts = {path: np.shape(leaves[path])[axis] for path, axis in cut.items()}
  groups: dict[str, list[spec_lib.AxisRef]] = {}
  sizes: dict[str, int] = {}
  for g, refs in spec.groups.items():
    if g in spec.batch_sizes:
      continue
    groups[g] = []
    for r in refs:
      if r.path not in cut:
        groups[g].append(r)
        continue
      if r.axis == cut[r.path]:
        raise ValueError(f"unstack: group {g!r} permutes axis {r.axis} of {tree.path_str(r.path)},"
                         " its copies' axis")
      groups[g] += [_copy_ref(r, i, cut[r.path]) for i in range(counts[r.path])]
    sizes[g] = spec.sizes[g]
  for i in range(max(spec.batch_sizes.values(), default=0)):
    for g, length in spec.batch_sizes.items():
      if i >= length:
        continue
      name = copy_name(g, i)
      if name in spec.groups or name in groups:
        raise ValueError(f"unstack: copy {i} of group {g!r} would be named {name!r}, which the spec already uses")
      groups[name] = [_copy_ref(r, i, r.batch) for r in spec.groups[g]]
      sizes[name] = spec.sizes[g]
  index = lambda axis, i: (slice(None),) * axis + (i,)  # noqa: E731
  flat = tree.replace_leaves(variables, {p: [leaves[p][index(a, i)] for i in range(counts[p])]
                                         for p, a in cut.items()})
  return spec_lib.PermutationSpec(groups, sizes), flat


def stack(spec: spec_lib.PermutationSpec, flat_variables: PyTree, *,
          stacked: Mapping[Path | str, int] | None = None) -> PyTree:
  """`unstack`'s inverse for variables: every list of copies stacked back on its batch axis.

  Args:
    spec: the stacked model's spec (as given to `unstack`).
    flat_variables: variables as `unstack` gives them.
    stacked: as given to `unstack`.

  Raises:
    ValueError: naming the leaf, where a stacked leaf's copies are missing.
  """
  cut = stacked_leaves(spec, stacked)
  found = set()

  def restack(path, x):
    key = tree.key_path(path)
    if key not in cut:
      return x
    found.add(key)
    if not isinstance(x, (list, tuple)) or not x:
      raise ValueError(f"stack: {tree.path_str(key)} is not a list of copies")
    xp = np if all(isinstance(c, np.ndarray) for c in x) else jnp
    return xp.stack(x, axis=cut[key])

  out = jax.tree_util.tree_map_with_path(restack, flat_variables, is_leaf=lambda x: isinstance(x, (list, tuple)))
  missing = sorted(tree.path_str(p) for p in set(cut) - found)
  if missing:
    raise ValueError(f"stack: no copies of {', '.join(missing)}")
  return out


def unstack_permutation(spec: spec_lib.PermutationSpec, perm: Mapping[str, Any]) -> dict[str, jax.Array]:
  """`perm` over `unstack`'s flat spec: `{copy_name(g, l): perm[g][l]}`, ordinary groups as they are."""
  out = {g: perm[g] for g in spec.groups if g not in spec.batch_sizes}
  for i in range(max(spec.batch_sizes.values(), default=0)):
    out.update({copy_name(g, i): perm[g][i] for g, length in spec.batch_sizes.items() if i < length})
  return out


def stack_permutation(spec: spec_lib.PermutationSpec, flat_perm: Mapping[str, Any]) -> dict[str, jax.Array]:
  """`unstack_permutation`'s inverse: each batched group's copies stacked as int[L, n].

  Also stacks anything keyed like a flat permutation (e.g. `MatchResult.pair_scores`).

  Raises:
    ValueError: naming the missing groups or copies.
  """
  want = [g for g in spec.groups if g not in spec.batch_sizes]
  want += [copy_name(g, i) for g, length in spec.batch_sizes.items() for i in range(length)]
  missing = [g for g in want if g not in flat_perm]
  if missing:
    raise ValueError(f"stack_permutation: missing {missing}")
  out = {}
  for g in spec.groups:
    if g in spec.batch_sizes:
      out[g] = jnp.stack([jnp.asarray(flat_perm[copy_name(g, i)]) for i in range(spec.batch_sizes[g])])
    else:
      out[g] = flat_perm[g]
  return out


def scanned_copies(variables: PyTree, kernel_paths) -> dict[Path, int]:
  """`{stacked leaf: 0}` for each kernel copy among `kernel_paths` (a `trace.kernel_uses(...,
  unroll_scans=True)` key `path + (str(l),)` whose `path` is a leaf): `unstack`'s `stacked=`
  that cuts every leaf a scan reads as a kernel into the copies the unrolled trace names."""
  leaves = tree.leaves_by_path(variables)
  return {p[:-1]: 0 for p in map(tuple, kernel_paths) if p not in leaves and p[:-1] in leaves}


def check_unbatched(spec: spec_lib.PermutationSpec, what: str) -> None:
  """Raises NotImplementedError naming `what` and the batched groups, if `spec` has any."""
  if spec.batch_sizes:
    raise NotImplementedError(
        f"{what} does not take batched groups (stacked copies, e.g. layers under scan): "
        f"{sorted(spec.batch_sizes)}; run it on the unrolled model, or on `mergejax.stacked.unstack`'s"
        " flat spec and variables with a function of them"
    )


def copy_owners(spec: spec_lib.PermutationSpec) -> dict[str, str]:
  """`{flat group: the spec's group}` over `unstack`'s flat spec: `"g[l]"` -> g, ordinary groups to themselves."""
  out = {g: g for g in spec.groups if g not in spec.batch_sizes}
  out.update({copy_name(g, i): g for g, length in spec.batch_sizes.items() for i in range(length)})
  return out


def unstack_per_copy(spec: spec_lib.PermutationSpec, per_group: Mapping[str, Any], what: str) -> dict[str, Any]:
  """A value per group over `unstack`'s flat spec: a batched group's is one for every copy or a sequence of L.

  Args:
    spec: the stacked spec.
    per_group: group -> a value (every copy of a batched group gets it), or,
      for a batched group of L copies, a list or tuple of L values (copy l
      gets entry l). Ordinary groups' values stay as they are.
    what: the caller's name, for errors.

  Raises:
    ValueError: naming the group, for a sequence of the wrong length.
  """
  out = {}
  for g, value in per_group.items():
    length = spec.batch_sizes.get(g)
    if length is None:
      out[g] = value
      continue
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):  # a NamedTuple is one value
      if len(value) != length:
        raise ValueError(f"{what}: batched group {g!r} has {length} copies but {len(value)} values")
      out.update({copy_name(g, i): v for i, v in enumerate(value)})
    else:
      out.update({copy_name(g, i): value for i in range(length)})
  return out


def unstack_leaf_keys(per_leaf: Mapping[Path, Any], cut: Mapping[Path, int], counts: Mapping[Path, int],
                      axes: bool = False) -> dict[Path, Any]:
  """Leaf-keyed values over the unstacked variables: a cut leaf's value goes to each of its copies.

  Args:
    per_leaf: `{leaf path: value}`; paths of copies (`path + (str(l),)`) and
      of leaves not cut stay as they are.
    cut: `{stacked leaf path: batch axis}` (`stacked_leaves`).
    counts: `{stacked leaf path: L}`.
    axes: the values are sets of axes of the stacked leaf, renumbered for
      the copies (the batch axis dropped).

  Raises:
    ValueError: naming the leaf, where `axes` holds its batch axis.
  """
  out = {}
  for path, value in per_leaf.items():
    path = tuple(path)
    if path not in cut:
      out[path] = value
      continue
    b = cut[path]
    if axes:
      if b in value:
        raise ValueError(f"{tree.path_str(path)}: axis {b} is its copies' axis, not an axis of a copy")
      value = frozenset(a - (a > b) for a in value)
    out.update({path + (str(i),): value for i in range(counts[path])})
  return out
