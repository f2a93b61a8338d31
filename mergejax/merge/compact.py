"""Compact merged models: every kernel stores and runs only its non-zero blocks.

A PLeaS or ZipIt! model laid out `merged | A only | B only` per group
(DESIGN.md, MergeLayout) has kernels whose outputs kept from A read nothing
kept only from B, and the reverse. Stored densely those blocks are zeros, and
the model runs above its budget's cost. `compact_variables` cuts each such
kernel into the blocks that are read, along its grouped input unit axis (in)
and grouped output unit axis (out):

    "merged": merged outputs  <- every input           (in: merged | A | B)
    "a":      A-only outputs  <- merged and A inputs   (in: merged | A)
    "b":      B-only outputs  <- merged and B inputs   (in: merged | B)

(a model's own task head, `models=(0,)` or `(1,)`: all its outputs <- the
merged and its own inputs). A kernel with several grouped components on a
side (attention: heads x head_dim, GQA's kv heads x queries per kv head) is
cut per cell of its output parts' grid: an output is merged when all its
output components are, A's when some are A's and none B's (then it reads the
inputs whose every component is merged or A's); one kept from A in one
component and from B in another reads nothing. A fused output axis (GPT-2's
q | k | v in one kernel) is cut per part, each part on its own groups.
`compact_apply(apply_fn)` runs the unchanged
`apply_fn` on such variables: it traces `apply_fn` with the dense shapes and
evaluates the jaxpr with every `dot_general` / `conv_general_dilated` that
reads a compact kernel replaced by the block products, concatenated in the
dense unit order. Their multiply-adds are the budget's cost terms exactly
(DESIGN.md, Budget: `c_t (2 - r_in r_out)`).

    inputs = kernel_inputs(apply_fn, merged, x)
    small = compact_variables(spec, layout, merged, inputs=inputs)
    y = jax.jit(compact_apply(apply_fn))(small, x)      # == apply_fn(merged, x)
    merged == dense_variables(small)
"""

from collections.abc import Callable, Mapping, Sequence
import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np

from mergejax import spec as spec_lib
from mergejax import trace
from mergejax import tree
from mergejax.merge import combine

PyTree = Any
Path = tuple[str, ...]
Range = tuple[int, int]
_PASS_THROUGH = frozenset(["convert_element_type", "copy", "copy_p"])


class Block(NamedTuple):
  """One block of a compact kernel's piece.

  Attributes:
    name: the outputs it computes: "merged", "a" or "b" ("whole" for a piece
      stored whole); with several grouped output components, suffixed by each
      one's part (`m`, `a`, `b`), e.g. "a_ma".
    outputs: per output axis (`KernelBlocks.output_axes`), its units `(start, stop)`.
    inputs: per input axis (`KernelBlocks.input_axes`), the unit ranges it reads, in order.
  """

  name: str
  outputs: tuple[Range, ...]
  inputs: tuple[tuple[Range, ...], ...]


class KernelBlocks(NamedTuple):
  """How one piece of a compact kernel is cut (static: hashable).

  Attributes:
    shape: the piece's dense shape.
    split: its split shape (factored axes split into their components,
      `combine.LeafView`), in which the blocks are stored.
    parts: how many split axes each dense axis became.
    input_axes: the split positions of the grouped input components with kept units.
    output_axes: the split positions of the grouped output components with
      kept units (none for a model's own task head, or a piece stored whole).
    output_cuts: per output axis, the ranges tiling it (merged | A | B, empty
      ones left out): the output is the grid of these cells, each computed by
      the block of that cell, or zeros where none does (an output kept from A
      in one component and from B in another reads nothing).
    blocks: the blocks, in grid order.
  """

  shape: tuple[int, ...]
  split: tuple[int, ...]
  parts: tuple[int, ...]
  input_axes: tuple[int, ...]
  output_axes: tuple[int, ...]
  output_cuts: tuple[tuple[Range, ...], ...]
  blocks: tuple[Block, ...]

  def dense_axis(self, position: int) -> int:
    """The dense axis holding split position `position`."""
    return int(np.searchsorted(np.cumsum(self.parts), position, side="right"))

  def components(self, axis: int) -> tuple[int, ...]:
    """The split sizes of dense axis `axis`."""
    start = sum(self.parts[:axis])
    return self.split[start:start + self.parts[axis]]


class CompactPlan(NamedTuple):
  """How a compact kernel cuts its dense array (static: hashable).

  Attributes:
    shape: the dense kernel's shape.
    axis: the fused output axis its pieces cut (GPT-2's q | k | v), or None
      (one piece: the whole kernel).
    pieces: `(start, stop, KernelBlocks)` per piece, in order along `axis`.
  """

  shape: tuple[int, ...]
  axis: int | None
  pieces: tuple[tuple[int, int, KernelBlocks], ...]

  def names(self) -> list[str]:
    """Every block's name, piece by piece (prefixed `part<i>_` for several pieces)."""
    if len(self.pieces) == 1:
      return [b.name for b in self.pieces[0][2].blocks]
    return [f"part{i}_{b.name}" for i, (_, _, kb) in enumerate(self.pieces) for b in kb.blocks]

  def split_arrays(self, arrays: Sequence[jax.Array]) -> list[tuple[int, int, KernelBlocks, Sequence[jax.Array]]]:
    """`(start, stop, KernelBlocks, its block arrays)` per piece."""
    out, at = [], 0
    for start, stop, kb in self.pieces:
      out.append((start, stop, kb, arrays[at:at + len(kb.blocks)]))
      at += len(kb.blocks)
    return out


@jax.tree_util.register_pytree_with_keys_class
class CompactKernel:
  """A kernel stored as its blocks; a pytree whose leaves are the block arrays.

  Attributes:
    arrays: one array per block of `plan`, piece by piece: the piece in its
      split shape, cut to the block's output units and input ranges
      (concatenated).
    plan: the `CompactPlan`.
  """

  def __init__(self, arrays: Sequence[jax.Array], plan: CompactPlan):
    self.arrays = tuple(arrays)
    self.plan = plan

  @property
  def shape(self) -> tuple[int, ...]:
    """The dense kernel's shape."""
    return self.plan.shape

  @property
  def dtype(self):
    return jnp.result_type(self.arrays[0])

  def tree_flatten_with_keys(self):
    return [(jax.tree_util.GetAttrKey(n), x) for n, x in zip(self.plan.names(), self.arrays)], self.plan

  @classmethod
  def tree_unflatten(cls, plan, arrays):
    return cls(arrays, plan)

  def __repr__(self):
    blocks = ", ".join(f"{n}: {tuple(np.shape(x))}" for n, x in zip(self.plan.names(), self.arrays))
    return f"CompactKernel(dense {self.plan.shape}; {blocks})"


def _is_compact(x) -> bool:
  return isinstance(x, CompactKernel)


def kernel_inputs(apply_fn: Callable[..., Any], variables: PyTree, *example_args: Any
                  ) -> dict[Path, frozenset[int]]:
  """Kernel path -> the kernel axes it contracts with its input, from one abstract trace.

  Args:
    apply_fn: `apply_fn(variables, *example_args)`.
    variables: the (dense) variables, arrays or `jax.ShapeDtypeStruct`s.
    *example_args: example inputs; only their shapes matter.

  Raises:
    ValueError: naming a kernel used with different contracted axes.
  """
  found = {}

  def probe(v, *args):
    _, uses = trace.kernel_uses(apply_fn)(v, *args)
    found.update(uses)
    return 0

  jax.eval_shape(probe, variables, *example_args)
  out = {}
  for path, uses in found.items():
    axes = {frozenset(k for _, k in u.input_axes) for u in uses}
    if len(axes) != 1:
      raise ValueError(f"kernel_inputs: {tree.path_str(path)} is used contracting different axes"
                       f" {sorted(sorted(a) for a in axes)}")
    out[path] = axes.pop()
  return out


def _ranges(*ranges: Range) -> tuple[Range, ...]:
  """Non-empty ranges, adjacent ones joined."""
  out: list[Range] = []
  for start, stop in ranges:
    if stop <= start:
      continue
    if out and out[-1][1] == start:
      out[-1] = (out[-1][0], stop)
    else:
      out.append((start, stop))
  return tuple(out)


def kernel_blocks(path: Path, shape: Sequence[int], refs: Sequence[tuple[str, spec_lib.AxisRef]],
                  sizes: Mapping[str, int], contracted: frozenset[int], layout: spec_lib.MergeLayout,
                  models: Sequence[int] = (0, 1)) -> CompactPlan | None:
  """The blocks of one kernel, or None where every output reads every input.

  Each output unit is classed by its grouped output components with kept
  units: merged (all merged), A (some kept from A, none from B), B, or
  neither (kept from A in one component and from B in another: reads
  nothing). Merged outputs read every input; A outputs the inputs whose
  grouped components are all merged or kept from A; B likewise. One block
  per cell of the grid of output parts (module doc).

  Args:
    path: the kernel's path (for errors).
    shape: its dense (merged) shape.
    refs: its (group, AxisRef)s (`combine.refs_by_leaf`), on the original model's axes.
    sizes: the groups' original sizes (`spec.sizes`).
    contracted: the kernel axes contracted with its input.
    layout: the merged model's layout.
    models: the models reaching the kernel: `(0,)` or `(1,)` for a model's
      own task head (every output reads the merged and its own inputs).

  Raises:
    ValueError: naming the path, where its shape is not the one the layout gives.
    NotImplementedError: naming the path, for an input axis cut into parts
      (fused) with kept units.
  """
  where = tree.path_str(path)
  widths = {g: layout[g].width for g, _ in refs}
  original = _original_shape(shape, refs, sizes, widths, where)
  pieces = combine.leaf_pieces(original, refs, where)
  merged = [p.view.merged_shape(widths) for p in pieces]
  axis = pieces[0].axis
  if axis is not None and axis in contracted and any(_kept(layout, g) for p in pieces for _, g in p.view.groups):
    raise NotImplementedError(f"compact_variables: {where} has input axis {axis} cut into parts (fused) with kept"
                              " units; compact kernels cut fused output axes only")
  total = merged[0] if axis is None else (*merged[0][:axis], sum(m[axis] for m in merged), *merged[0][axis + 1:])
  if total != tuple(shape):
    raise ValueError(f"compact_variables: {where} has shape {tuple(shape)} where the layout gives {total}")
  cut = [_piece_blocks(p.view, m, widths, contracted, layout, tuple(models)) for p, m in zip(pieces, merged)]
  if all(kb is None for kb in cut):
    return None
  out, at = [], 0
  for kb, m in zip(cut, merged):
    stop = at + (m[axis] if axis is not None else 0)
    out.append((at, stop, kb if kb is not None else _whole(m)))
    at = stop
  return CompactPlan(tuple(shape), axis, tuple(out))


def _kept(layout: spec_lib.MergeLayout, g: str) -> bool:
  return layout[g].n_a > 0 or layout[g].n_b > 0


def _original_shape(shape, refs, sizes, widths, where) -> list[int]:
  """The original model's shape of a merged leaf of `shape` (a fused axis: its parts at their original sizes)."""
  original = list(shape)
  parted: dict[tuple[int, Range], list] = {}
  for g, r in refs:
    if r.part is None:
      original[r.axis] = sizes[g] if r.factor is None else math.prod(r.factor[0])
    else:
      parted.setdefault((r.axis, r.part), []).append((g, r._replace(axis=0, part=None)))
  for (axis, (start, stop)), part_refs in parted.items():
    grown = combine.leaf_view((stop - start,), part_refs, where).merged_shape(widths)[0]
    original[axis] -= grown - (stop - start)
  return original


def _whole(shape: Sequence[int]) -> KernelBlocks:
  """A piece stored whole: one block reading every input for every output."""
  return KernelBlocks(tuple(shape), tuple(shape), (1,) * len(shape), (), (), (), (Block("whole", (), ()),))


def _piece_blocks(view: combine.LeafView, shape: Sequence[int], widths: Mapping[str, int], contracted: frozenset[int],
                  layout: spec_lib.MergeLayout, models: tuple[int, ...]) -> KernelBlocks | None:
  """One piece's blocks (`kernel_blocks`), or None where every output reads every input."""
  split = list(view.shape)
  for pos, g in view.groups:
    split[pos] = widths[g]
  ends = np.cumsum(view.parts)
  axis_of = lambda pos: int(np.searchsorted(ends, pos, side="right"))
  ins = [(pos, g) for pos, g in view.groups if _kept(layout, g) and axis_of(pos) in contracted]
  outs = [(pos, g) for pos, g in view.groups if _kept(layout, g) and axis_of(pos) not in contracted]
  if not ins:
    return None
  thirds = lambda g: ((0, layout[g].n_merged), (layout[g].n_merged, layout[g].n_merged + layout[g].n_a),
                      (layout[g].n_merged + layout[g].n_a, layout[g].width))
  reads = {"merged": tuple(((0, widths[g]),) for _, g in ins),
           "a": tuple(_ranges(thirds(g)[0], thirds(g)[1]) for _, g in ins),
           "b": tuple(_ranges(thirds(g)[0], thirds(g)[2]) for _, g in ins)}
  make = lambda outputs, output_cuts, blocks: KernelBlocks(tuple(shape), tuple(split), view.parts,
                                                           tuple(p for p, _ in ins), outputs, output_cuts, blocks)
  if models in ((0,), (1,)):
    name = "a" if models == (0,) else "b"
    if reads[name] == reads["merged"]:
      return None
    return make((), (), (Block(name, (), reads[name]),))
  if not outs:
    return None
  cuts = [[(letter, r) for letter, r in zip("mab", thirds(g)) if r[1] > r[0]] for _, g in outs]
  blocks = []
  for cell in itertools.product(*cuts):
    letters = "".join(letter for letter, _ in cell)
    if "a" in letters and "b" in letters:
      continue
    name = "a" if "a" in letters else "b" if "b" in letters else "merged"
    if all(reads[name]):
      blocks.append(Block(name if len(outs) == 1 else f"{name}_{letters}", tuple(r for _, r in cell), reads[name]))
  return make(tuple(p for p, _ in outs), tuple(tuple(r for _, r in c) for c in cuts), tuple(blocks))


def _cut_piece(x: jax.Array, kb: KernelBlocks) -> list[jax.Array]:
  """The blocks of one dense piece."""
  x = jnp.reshape(x, kb.split)
  out = []
  for b in kb.blocks:
    y = x
    for pos, r in zip(kb.output_axes, b.outputs):
      y = jax.lax.slice_in_dim(y, *r, axis=pos)
    for pos, ranges in zip(kb.input_axes, b.inputs):
      y = _take_ranges(y, ranges, pos)
    out.append(y)
  return out


def _cut(x: jax.Array, plan: CompactPlan) -> list[jax.Array]:
  """The blocks of a dense kernel, piece by piece."""
  if plan.axis is None:
    return _cut_piece(x, plan.pieces[0][2])
  return [y for start, stop, kb in plan.pieces
          for y in _cut_piece(jax.lax.slice_in_dim(x, start, stop, axis=plan.axis), kb)]


def _take_ranges(x: jax.Array, ranges: Sequence[Range], axis: int) -> jax.Array:
  parts = [jax.lax.slice_in_dim(x, start, stop, axis=axis) for start, stop in ranges]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _dense_piece(kb: KernelBlocks, arrays: Sequence[jax.Array], dtype) -> jax.Array:
  """One piece's dense array (zeros outside its blocks)."""
  x = jnp.zeros(kb.split, dtype)
  for b, block in zip(kb.blocks, arrays):
    # Each input axis reads its ranges concatenated: the block is their product, range by range.
    starts = [np.cumsum([0] + [stop - start for start, stop in ranges]) for ranges in b.inputs]
    for choice in itertools.product(*(range(len(ranges)) for ranges in b.inputs)):
      index = [slice(None)] * len(kb.split)
      piece = block
      for pos, r in zip(kb.output_axes, b.outputs):
        index[pos] = slice(*r)
      for pos, ranges, at, i in zip(kb.input_axes, b.inputs, starts, choice):
        index[pos] = slice(*ranges[i])
        piece = jax.lax.slice_in_dim(piece, int(at[i]), int(at[i + 1]), axis=pos)
      x = x.at[tuple(index)].set(piece)
  return jnp.reshape(x, kb.shape)


def dense_kernel(kernel: CompactKernel) -> jax.Array:
  """The dense array of a compact kernel (zeros outside its blocks)."""
  plan = kernel.plan
  pieces = [_dense_piece(kb, arrays, kernel.dtype) for _, _, kb, arrays in plan.split_arrays(kernel.arrays)]
  return pieces[0] if plan.axis is None else jnp.concatenate(pieces, axis=plan.axis)


@jax.jit
def dense_variables(variables: PyTree) -> PyTree:
  """Compact variables back in the dense form (every CompactKernel a dense array)."""
  return jax.tree.map(lambda x: dense_kernel(x) if _is_compact(x) else x, variables, is_leaf=_is_compact)


@functools.partial(jax.jit, static_argnums=0)
def _cut_kernels(plans: tuple[CompactPlan, ...], kernels: tuple[jax.Array, ...]
                 ) -> tuple[list[CompactKernel], list[jax.Array]]:
  """Each kernel's blocks, and the largest |entry| outside them (one compiled program)."""
  out, dropped = [], []
  for plan, x in zip(plans, kernels):
    kernel = CompactKernel(_cut(x, plan), plan)
    out.append(kernel)
    dropped.append(jnp.max(jnp.abs(x - dense_kernel(kernel)), initial=0.0))
  return out, dropped


def compact_variables(
    spec: spec_lib.PermutationSpec,
    layout: spec_lib.MergeLayout | Mapping[str, Any],
    variables: PyTree,
    *,
    inputs: Mapping[Path, frozenset[int]],
    models: Mapping[Path, Sequence[int]] | None = None,
) -> PyTree:
  """Merged variables with every kernel cut into the blocks it reads (module doc).

  Args:
    spec: the permutation groups the merge used (unbatched).
    layout: the merged model's `MergeLayout` (each group `merged | A only | B only`).
    variables: the merged (dense) variables.
    inputs: kernel path -> the kernel axes it contracts with its input
      (`kernel_inputs`); leaves not named are kept whole.
    models: leaf path -> the models reaching it, `(0,)` / `(1,)` for a
      model's own task head (as `combine.combine` takes them).

  Returns:
    `variables` with each kernel that has structurally zero blocks a
    `CompactKernel`; every other leaf as it was.

  Raises:
    ValueError: naming the path, for a kernel not in `variables`, a width
      the layout does not give, or a non-zero entry outside the blocks (the
      compact form would compute another function).
    NotImplementedError: for a batched spec (stacked copies) or a kernel
      `kernel_blocks` cannot cut (a fused input axis with kept units).
  """
  if spec.batch_sizes:
    raise NotImplementedError(f"compact_variables: batched groups {sorted(spec.batch_sizes)} (stacked copies);"
                              " unstack the model first (mergejax.stacked)")
  layout = layout if isinstance(layout, spec_lib.MergeLayout) else spec_lib.MergeLayout(layout)
  missing = sorted(set(spec.groups) - set(layout))
  if missing:
    raise ValueError(f"compact_variables: the layout has no groups {missing}")
  models = models or {}
  leaves = tree.leaves_by_path(variables)
  by_leaf = combine.refs_by_leaf(spec)
  plans = {}
  for path, axes in inputs.items():
    path = tuple(path)
    if path not in leaves:
      raise ValueError(f"compact_variables: inputs name {tree.path_str(path)}, which is not a leaf of the variables")
    plan = kernel_blocks(path, np.shape(leaves[path]), by_leaf.get(path, []), spec.sizes, frozenset(axes), layout,
                         models.get(path, (0, 1)))
    if plan is not None:
      plans[path] = plan
  kernels, dropped = _cut_kernels(tuple(plans.values()), tuple(jnp.asarray(leaves[p]) for p in plans))
  for path, largest in zip(plans, dropped):
    if float(largest) != 0.0:
      raise ValueError(f"compact_variables: {tree.path_str(path)} has entries up to {float(largest):.3g} outside"
                       " the blocks its layout reads (an output kept from one model reading units kept only from"
                       " the other); compact only merged models' variables")
  return tree.replace_leaves(variables, dict(zip(plans, kernels)))


class _Marked(NamedTuple):
  """A compact kernel flowing through the jaxpr, with its path for errors."""

  kernel: CompactKernel
  path: str


def compact_apply(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`apply_fn` run on compact variables at the compact cost.

  Args:
    apply_fn: `apply_fn(variables, *args, **kwargs)` on dense variables
      (e.g. `functools.partial(model.apply, train=False)`); `kwargs` are static.

  Returns:
    `fn(compact variables, *args, **kwargs)`, equal to `apply_fn(
    dense_variables(variables), *args, **kwargs)`; jittable. Each
    `dot_general` / `conv_general_dilated` reading a compact kernel (directly,
    through casts, or inside `pjit`, `remat` and custom-derivative calls) runs
    one product per block.

  Raises (when called):
    NotImplementedError: naming the kernel and the primitive, where a compact
      kernel is read by anything else (a transpose, a reshape, a `scan`...),
      returned, or is the lhs of a convolution.
  """

  def run(variables: PyTree, *args: Any, **kwargs: Any):
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables, is_leaf=_is_compact)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_compact(x)
              else jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for _, x in flat]
    dense = jax.tree_util.tree_unflatten(treedef, shapes)
    closed, out_shape = jax.make_jaxpr(lambda v, *a: apply_fn(v, *a, **kwargs), return_shape=True)(dense, *args)
    values = [_Marked(x, tree.path_str(p)) if _is_compact(x) else x for p, x in flat]
    outs = _evaluate(closed.jaxpr, closed.consts, values + jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return run


def _refuse(marked: _Marked, construct: str) -> NotImplementedError:
  return NotImplementedError(
      f"compact_apply: the compact kernel {marked.path} is {construct}; a compact kernel is read only by"
      " dot_general or conv_general_dilated (as the rhs of a convolution), through casts and calls")


def _evaluate(jaxpr, consts, args) -> list:
  """Evaluates a jaxpr on values and `_Marked` compact kernels."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))

  def read(atom):
    return atom.val if isinstance(atom, jex_core.Literal) else env[atom]

  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    marked = [v for v in values if isinstance(v, _Marked)]
    name = eqn.primitive.name
    params = eqn.primitive.get_bind_params(eqn.params)
    if not marked:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*values, **params)
    elif name in trace.CALLS and trace.CALLS[name] in eqn.params:
      inner = eqn.params[trace.CALLS[name]]
      inner_jaxpr = getattr(inner, "jaxpr", inner)
      outs = _evaluate(inner_jaxpr, getattr(inner, "consts", []), values[-len(inner_jaxpr.invars):])
    elif name in _PASS_THROUGH:
      (m,) = marked
      arrays = [eqn.primitive.bind(x, **params) for x in m.kernel.arrays]
      outs = [_Marked(CompactKernel(arrays, m.kernel.plan), m.path)]
    elif name == "dot_general":
      outs = [_dot(eqn, values, params)]
    elif name == "conv_general_dilated":
      outs = [_conv(eqn, values, params)]
    else:
      raise _refuse(marked[0], f"read by `{name}`")
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    env.update(zip(eqn.outvars, outs))
  results = [read(v) for v in jaxpr.outvars]
  for r in results:
    if isinstance(r, _Marked):
      raise _refuse(r, "returned by the function")
  return results


def _dot(eqn, values, params) -> jax.Array:
  """A dot_general with one compact operand: one product per block, pieces concatenated."""
  if all(isinstance(v, _Marked) for v in values):
    raise _refuse(values[0], "multiplied by another compact kernel")
  kernel_is_lhs = isinstance(values[0], _Marked)
  marked, x = (values[0], values[1]) if kernel_is_lhs else (values[1], values[0])
  plan = marked.kernel.plan
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  kc, xc, kb, xb = (lc, rc, lb, rb) if kernel_is_lhs else (rc, lc, rb, lb)
  out_shape = eqn.outvars[0].aval.shape
  if plan.axis is None:
    (_, _, piece, arrays), = plan.split_arrays(marked.kernel.arrays)
    return _dot_piece(eqn.primitive, marked, piece, arrays, x, kernel_is_lhs, params, out_shape)
  if plan.axis in tuple(kc) + tuple(kb):
    raise _refuse(marked, "read by a dot_general that contracts its fused axis")
  k_free = [a for a in range(len(plan.shape)) if a not in kc and a not in kb]
  x_free = [a for a in range(x.ndim) if a not in xc and a not in xb]
  at = len(kb) + k_free.index(plan.axis) + (0 if kernel_is_lhs else len(x_free))
  outs = [_dot_piece(eqn.primitive, marked, piece, arrays, x, kernel_is_lhs, params,
                     (*out_shape[:at], stop - start, *out_shape[at + 1:]))
          for start, stop, piece, arrays in plan.split_arrays(marked.kernel.arrays)]
  return jnp.concatenate(outs, axis=at)


def _dot_piece(primitive, marked, plan: KernelBlocks, arrays, x, kernel_is_lhs, params, out_shape) -> jax.Array:
  """One piece's product: a dot_general per block on the input ranges it reads, the output grid assembled."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  kc, xc, kb, xb = (lc, rc, lb, rb) if kernel_is_lhs else (rc, lc, rb, lb)
  if any(plan.dense_axis(p) not in kc for p in plan.input_axes):
    raise _refuse(marked, "read by a dot_general that does not contract its input axis")
  if any(plan.dense_axis(p) in tuple(kc) + tuple(kb) for p in plan.output_axes):
    raise _refuse(marked, "read by a dot_general that contracts its output axis")
  # x's axes paired with the kernel's are split as the kernel's are.
  paired = dict(zip(xc, kc)) | dict(zip(xb, kb))
  x_sizes = [plan.components(paired[d]) if d in paired else (x.shape[d],) for d in range(x.ndim)]
  x = jnp.reshape(x, [s for sizes in x_sizes for s in sizes])
  x_start = np.concatenate([[0], np.cumsum([len(s) for s in x_sizes])])
  k_start = np.concatenate([[0], np.cumsum(plan.parts)])
  expand = lambda xs, ks: ([int(x_start[d]) + i for d, k in zip(xs, ks) for i in range(plan.parts[k])],
                           [int(k_start[k]) + i for k in ks for i in range(plan.parts[k])])
  new_xc, new_kc = expand(xc, kc)
  new_xb, new_kb = expand(xb, kb)
  dims = ((new_kc, new_xc), (new_kb, new_xb)) if kernel_is_lhs else ((new_xc, new_kc), (new_xb, new_kb))
  dims = tuple(tuple(tuple(d) for d in pair) for pair in dims)
  products = {}
  for b, block in zip(plan.blocks, arrays):
    xs = x
    for pos, ranges in zip(plan.input_axes, b.inputs):
      xs = _take_ranges(xs, ranges, new_xc[new_kc.index(pos)])
    operands = (block, xs) if kernel_is_lhs else (xs, block)
    products[b.outputs] = primitive.bind(*operands, **{**params, "dimension_numbers": dims})
  k_free = [p for p in range(len(plan.split)) if p not in new_kc and p not in new_kb]
  x_free = [p for p in range(x.ndim) if p not in new_xc and p not in new_xb]
  at = [len(new_kb) + k_free.index(p) + (0 if kernel_is_lhs else len(x_free)) for p in plan.output_axes]
  return jnp.reshape(_assemble(products, plan.output_cuts, at), out_shape)


def _assemble(products: Mapping[tuple[Range, ...], jax.Array], cuts: Sequence[Sequence[Range]],
              axes: Sequence[int]) -> jax.Array:
  """The output grid: cell `(r_1, ..., r_k)` (one range of each `cuts[j]`, along `axes[j]`) is
  `products[cell]`, or zeros where no block computes it."""
  template = next(iter(products.values()))

  def grid(prefix: tuple[Range, ...]) -> jax.Array:
    j = len(prefix)
    if j == len(cuts):
      if prefix in products:
        return products[prefix]
      shape = list(template.shape)
      for axis, (start, stop) in zip(axes, prefix):
        shape[axis] = stop - start
      return jnp.zeros(shape, template.dtype)
    cells = [grid((*prefix, r)) for r in cuts[j]]
    return cells[0] if len(cells) == 1 else jnp.concatenate(cells, axis=axes[j])

  return grid(())


def _conv(eqn, values, params) -> jax.Array:
  """A convolution whose rhs is compact: one convolution per block."""
  if isinstance(values[0], _Marked):
    raise _refuse(values[0], "the lhs (input) of a convolution")
  x, marked = values
  plan = marked.kernel.plan
  dn = params["dimension_numbers"]
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    raise _refuse(marked, "read by a grouped convolution")
  if plan.axis is not None:
    raise _refuse(marked, "read by a convolution, with a fused axis cut into parts")
  (_, _, piece, arrays), = plan.split_arrays(marked.kernel.arrays)
  if piece.split != piece.shape or piece.input_axes != (dn.rhs_spec[1],) or (
      piece.output_axes not in ((), (dn.rhs_spec[0],))):
    raise _refuse(marked, "read by a convolution along other axes than its grouped ones")
  products = {b.outputs: eqn.primitive.bind(_take_ranges(x, b.inputs[0], dn.lhs_spec[1]), block, **params)
              for b, block in zip(piece.blocks, arrays)}
  return _assemble(products, piece.output_cuts, (dn.out_spec[1],) * len(piece.output_axes))
