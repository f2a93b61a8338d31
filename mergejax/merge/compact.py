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
merged and its own inputs). `compact_apply(apply_fn)` runs the unchanged
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
  """One block of a compact kernel.

  Attributes:
    name: "merged", "a" or "b" (the outputs it computes).
    outputs: the output component's units `(start, stop)`; None: all outputs.
    inputs: the input component's unit ranges it reads, in order.
  """

  name: str
  outputs: Range | None
  inputs: tuple[Range, ...]


class KernelBlocks(NamedTuple):
  """How a compact kernel cuts its dense array (static: hashable).

  Attributes:
    shape: the dense kernel's shape.
    split: its split shape (factored axes split into their components,
      `combine.LeafView`), in which the blocks are stored.
    parts: how many split axes each dense axis became.
    input_axis: the split position of the grouped input component.
    output_axis: the split position of the grouped output component, or None.
    blocks: the blocks, in output order.
  """

  shape: tuple[int, ...]
  split: tuple[int, ...]
  parts: tuple[int, ...]
  input_axis: int
  output_axis: int | None
  blocks: tuple[Block, ...]

  def dense_axis(self, position: int) -> int:
    """The dense axis holding split position `position`."""
    return int(np.searchsorted(np.cumsum(self.parts), position, side="right"))

  def components(self, axis: int) -> tuple[int, ...]:
    """The split sizes of dense axis `axis`."""
    start = sum(self.parts[:axis])
    return self.split[start:start + self.parts[axis]]


@jax.tree_util.register_pytree_with_keys_class
class CompactKernel:
  """A kernel stored as its blocks; a pytree whose leaves are the block arrays.

  Attributes:
    arrays: one array per block of `plan`: the kernel in its split shape,
      cut to the block's output units and its input ranges (concatenated).
    plan: the `KernelBlocks`.
  """

  def __init__(self, arrays: Sequence[jax.Array], plan: KernelBlocks):
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
    return [(jax.tree_util.GetAttrKey(b.name), x) for b, x in zip(self.plan.blocks, self.arrays)], self.plan

  @classmethod
  def tree_unflatten(cls, plan, arrays):
    return cls(arrays, plan)

  def __repr__(self):
    blocks = ", ".join(f"{b.name}: {tuple(np.shape(x))}" for b, x in zip(self.plan.blocks, self.arrays))
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
                  models: Sequence[int] = (0, 1)) -> KernelBlocks | None:
  """The blocks of one kernel, or None where every output reads every input.

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
    NotImplementedError: naming the path, for a fused axis cut into parts, or
      several grouped components with kept units on one side of the kernel.
  """
  where = tree.path_str(path)
  kept = lambda g: layout[g].n_a > 0 or layout[g].n_b > 0
  if any(r.part is not None for _, r in refs):
    if any(kept(g) for g, _ in refs):
      raise NotImplementedError(f"compact_variables: {where} is a fused axis cut into parts with kept units;"
                                " compact kernels cut whole axes")
    return None
  original = list(shape)  # the refs view the original model's axes
  for g, r in refs:
    original[r.axis] = sizes[g] if r.factor is None else math.prod(r.factor[0])
  view = combine.leaf_view(original, refs, where)
  widths = {g: layout[g].width for g, _ in refs}
  if view.merged_shape(widths) != tuple(shape):
    raise ValueError(f"compact_variables: {where} has shape {tuple(shape)} where the layout gives"
                     f" {view.merged_shape(widths)}")
  split = list(view.shape)
  for pos, g in view.groups:
    split[pos] = widths[g]
  view = view._replace(shape=tuple(split))
  ends = np.cumsum(view.parts)
  axis_of = lambda pos: int(np.searchsorted(ends, pos, side="right"))
  ins = [(pos, g) for pos, g in view.groups if kept(g) and axis_of(pos) in contracted]
  outs = [(pos, g) for pos, g in view.groups if kept(g) and axis_of(pos) not in contracted]
  if not ins:
    return None
  if len(ins) > 1 or len(outs) > 1:
    raise NotImplementedError(f"compact_variables: {where} has several grouped components with kept units on one"
                              f" side ({[g for _, g in ins]} in, {[g for _, g in outs]} out); compact kernels cut"
                              " one per side")
  (in_pos, in_group), = ins
  li = layout[in_group]
  merged_in, a_in, b_in = (0, li.n_merged), (li.n_merged, li.n_merged + li.n_a), (li.n_merged + li.n_a, li.width)
  models = tuple(models)
  if models in ((0,), (1,)):
    reads = _ranges(merged_in, a_in if models == (0,) else b_in)
    if reads == ((0, li.width),):
      return None
    blocks = (Block("a" if models == (0,) else "b", None, reads),)
    return KernelBlocks(tuple(shape), view.shape, view.parts, in_pos, None, blocks)
  if not outs:
    return None
  (out_pos, out_group), = outs
  lo = layout[out_group]
  candidates = [Block("merged", (0, lo.n_merged), _ranges((0, li.width))),
                Block("a", (lo.n_merged, lo.n_merged + lo.n_a), _ranges(merged_in, a_in)),
                Block("b", (lo.n_merged + lo.n_a, lo.width), _ranges(merged_in, b_in))]
  blocks = tuple(b for b in candidates if b.outputs[1] > b.outputs[0] and b.inputs)
  return KernelBlocks(tuple(shape), view.shape, view.parts, in_pos, out_pos, blocks)


def _cut(x: jax.Array, plan: KernelBlocks) -> list[jax.Array]:
  """The blocks of a dense kernel."""
  x = jnp.reshape(x, plan.split)
  out = []
  for b in plan.blocks:
    y = x if b.outputs is None else jax.lax.slice_in_dim(x, *b.outputs, axis=plan.output_axis)
    out.append(_take_ranges(y, b.inputs, plan.input_axis))
  return out


def _take_ranges(x: jax.Array, ranges: Sequence[Range], axis: int) -> jax.Array:
  parts = [jax.lax.slice_in_dim(x, start, stop, axis=axis) for start, stop in ranges]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def dense_kernel(kernel: CompactKernel) -> jax.Array:
  """The dense array of a compact kernel (zeros outside its blocks)."""
  plan = kernel.plan
  x = jnp.zeros(plan.split, kernel.dtype)
  for b, block in zip(plan.blocks, kernel.arrays):
    at = 0
    for start, stop in b.inputs:
      piece = jax.lax.slice_in_dim(block, at, at + stop - start, axis=plan.input_axis)
      index = [slice(None)] * len(plan.split)
      index[plan.input_axis] = slice(start, stop)
      if b.outputs is not None:
        index[plan.output_axis] = slice(*b.outputs)
      x = x.at[tuple(index)].set(piece)
      at += stop - start
  return jnp.reshape(x, plan.shape)


@jax.jit
def dense_variables(variables: PyTree) -> PyTree:
  """Compact variables back in the dense form (every CompactKernel a dense array)."""
  return jax.tree.map(lambda x: dense_kernel(x) if _is_compact(x) else x, variables, is_leaf=_is_compact)


@functools.partial(jax.jit, static_argnums=0)
def _cut_kernels(plans: tuple[KernelBlocks, ...], kernels: tuple[jax.Array, ...]
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
      `kernel_blocks` cannot cut.
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
  """A dot_general with one compact operand: one product per block."""
  if all(isinstance(v, _Marked) for v in values):
    raise _refuse(values[0], "multiplied by another compact kernel")
  kernel_is_lhs = isinstance(values[0], _Marked)
  marked, x = (values[0], values[1]) if kernel_is_lhs else (values[1], values[0])
  plan = marked.kernel.plan
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  kc, xc, kb, xb = (lc, rc, lb, rb) if kernel_is_lhs else (rc, lc, rb, lb)
  if plan.dense_axis(plan.input_axis) not in kc:
    raise _refuse(marked, "read by a dot_general that does not contract its input axis")
  if plan.output_axis is not None and plan.dense_axis(plan.output_axis) in tuple(kc) + tuple(kb):
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
  x_in = new_xc[new_kc.index(plan.input_axis)]
  dims = ((new_kc, new_xc), (new_kb, new_xb)) if kernel_is_lhs else ((new_xc, new_kc), (new_xb, new_kb))
  dims = tuple(tuple(tuple(d) for d in pair) for pair in dims)
  products = []
  for b, block in zip(plan.blocks, marked.kernel.arrays):
    xs = _take_ranges(x, b.inputs, x_in)
    operands = (block, xs) if kernel_is_lhs else (xs, block)
    products.append(eqn.primitive.bind(*operands, **{**params, "dimension_numbers": dims}))
  if plan.output_axis is None:
    (y,) = products
  else:
    k_free = [p for p in range(len(plan.split)) if p not in new_kc and p not in new_kb]
    x_free = [p for p in range(x.ndim) if p not in new_xc and p not in new_xb]
    at = len(new_kb) + k_free.index(plan.output_axis) + (0 if kernel_is_lhs else len(x_free))
    y = jnp.concatenate(products, axis=at) if len(products) > 1 else products[0]
  return jnp.reshape(y, eqn.outvars[0].aval.shape)


def _conv(eqn, values, params) -> jax.Array:
  """A convolution whose rhs is compact: one convolution per block."""
  if isinstance(values[0], _Marked):
    raise _refuse(values[0], "the lhs (input) of a convolution")
  x, marked = values
  plan = marked.kernel.plan
  dn = params["dimension_numbers"]
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    raise _refuse(marked, "read by a grouped convolution")
  if plan.split != plan.shape or plan.input_axis != dn.rhs_spec[1] or (
      plan.output_axis is not None and plan.output_axis != dn.rhs_spec[0]):
    raise _refuse(marked, "read by a convolution along other axes than its grouped ones")
  products = [eqn.primitive.bind(_take_ranges(x, b.inputs, dn.lhs_spec[1]), block, **params)
              for b, block in zip(plan.blocks, marked.kernel.arrays)]
  return jnp.concatenate(products, axis=dn.out_spec[1]) if len(products) > 1 else products[0]

