"""Permutation specs learned from a function's jaxpr, and captured layer inputs.

    spec = permutation_spec(model.apply, variables, x)
    out, feats = capture(model.apply)(variables, x)

`permutation_spec` interprets the jaxpr of `apply_fn(variables, *example_args)`
abstractly. Every axis of every value is a list of *components* (an axis that
a reshape splits or merges has several), and a union-find joins the
components that must be permuted together for the function to stay the same:
the contracted axes of `dot_general` and `conv_general_dilated`, the axes of
elementwise operands, an axis and its image through transposes, broadcasts and
reshapes. A class that a reshape splits (the heads and head_dim of plain-jnp
attention, the (h*w, c) of a flatten before a Dense layer) is split in every
member, so factored axes come out as `AxisRef.factor`.

Fixed are the example arguments, the function's outputs (except outputs that
are variables, like BatchNorm statistics under `mutable`), constants, `iota`,
and every axis an operation does not treat alike for all its units: the
spatial window of a convolution, reductions other than sum/max/min/prod/and/
or, cumulative ops, sorts, slices, pads, reversals, concatenations, gathers
and scatters, control flow (`scan`, `cond`, `while`). A primitive the
interpreter does not know fixes every axis it touches and is named in a
warning: a coverage gap is visible, never unsound. Every equation that
carries a jaxpr (`pjit`, `remat2`, `custom_jvp_call`, `custom_vjp_call`,
`closed_call`) is interpreted inside, in a scope of its own per call site.

The groups are the classes that hold at least one variable axis, no fixed
axis, and more than one unit. Group names are deterministic: the first
AxisRef's path and axis, in the variables' flattening order.
"""

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any, NamedTuple
import warnings

import jax
from jax.extend import core as jex_core

from mergejax import spec as spec_lib
from mergejax import tree

PyTree = Any
Axis = list[int]  # the components of one axis: union-find node ids, row-major

ELEMENTWISE = frozenset("""
    abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp clz complex conj
    convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2
    expm1 floor ge gt igamma imag integer_pow is_finite le lgamma log log1p logistic lt
    max min mul ne neg nextafter not or population_count pow real reduce_precision rem
    round rsqrt select_n shift_left shift_right_arithmetic shift_right_logical sign sin
    sinh sqrt square stop_gradient sub tan tanh xor pvary optimization_barrier
""".split())
INVARIANT_REDUCTIONS = frozenset(
    ["reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or"]
)
CUMULATIVE = frozenset(["cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"])
CALLS = {  # primitive -> the param holding the jaxpr it calls
    "pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
}


class _Classes:
  """Union-find over axis components, with class-wide splits and fixing."""

  def __init__(self):
    self.parent: list[int] = []
    self.size: list[int] = []
    self.children: dict[int, list[int]] = {}
    self.members: dict[int, list[int]] = {}
    self.fixed: set[int] = set()  # roots

  def new(self, size: int, fixed: bool = False) -> list[int]:
    """A fresh axis of `size` units: one component, or none when size is 1."""
    if size == 1:
      return []
    node = len(self.parent)
    self.parent.append(node)
    self.size.append(size)
    self.members[node] = [node]
    if fixed:
      self.fixed.add(node)
    return [node]

  def find(self, node: int) -> int:
    root = node
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[node] != root:
      self.parent[node], node = root, self.parent[node]
    return root

  def leaves(self, axis: Sequence[int]) -> Axis:
    """The current components of an axis (nodes split since are expanded)."""
    out = []
    for node in axis:
      out.extend(self.leaves(self.children[node]) if node in self.children else [node])
    return out

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra == rb:
      return
    if len(self.members[ra]) < len(self.members[rb]):
      ra, rb = rb, ra
    self.parent[rb] = ra
    self.members[ra].extend(self.members.pop(rb))
    if rb in self.fixed:
      self.fixed.discard(rb)
      self.fixed.add(ra)

  def is_fixed(self, node: int) -> bool:
    return self.find(node) in self.fixed

  def fix(self, axes: Sequence[Sequence[int]]) -> None:
    for axis in axes:
      for node in self.leaves(axis):
        self.fixed.add(self.find(node))

  def split(self, node: int, sizes: Sequence[int]) -> None:
    """Splits `node`'s whole class into components of `sizes` (row-major)."""
    root = self.find(node)
    fixed = root in self.fixed
    members = self.members.pop(root)
    self.fixed.discard(root)
    first = None
    for m in members:
      parts = [c for s in sizes for c in self.new(s, fixed)]
      self.children[m] = parts
      if first is None:
        first = parts
      else:
        for p, q in zip(first, parts):
          self.union(p, q)

  def unify(self, a: Sequence[int], b: Sequence[int]) -> None:
    """Joins two axes of equal size, refining their components to agree."""
    while True:
      la, lb = self.leaves(a), self.leaves(b)
      sa, sb = [self.size[n] for n in la], [self.size[n] for n in lb]
      if sa == sb:
        for x, y in zip(la, lb):
          self.union(x, y)
        return
      cuts = sorted(set(_cumulative(sa)) | set(_cumulative(sb)))
      if any(b % a for a, b in zip(cuts, cuts[1:])):
        self.fix([la, lb])  # views that no common refinement reconciles
        return
      self._cut(la, cuts) or self._cut(lb, cuts)

  def _cut(self, axis: Axis, cuts: Sequence[int]) -> bool:
    """Splits the first component of `axis` that straddles a cut; True if any."""
    start = 1
    for node in axis:
      end = start * self.size[node]
      inner = [c for c in cuts if start < c < end]
      if inner:
        bounds = [start, *inner, end]
        self.split(node, [b // a for a, b in zip(bounds, bounds[1:])])
        return True
      start = end
    return False


def _cumulative(sizes: Sequence[int]) -> list[int]:
  out, p = [], 1
  for s in sizes:
    p *= s
    out.append(p)
  return out


class _Interpreter:
  """Abstract interpretation of a jaxpr over axis classes."""

  def __init__(self):
    self.classes = _Classes()
    self.unknown: set[str] = set()

  def fresh(self, shape: Sequence[int], fixed: bool = False) -> list[Axis]:
    return [self.classes.new(d, fixed) for d in shape]

  def read(self, env: dict, atom) -> list[Axis]:
    if isinstance(atom, jex_core.Literal):
      return self.fresh(getattr(atom.aval, "shape", ()), fixed=True)
    return env[atom]

  def run(self, jaxpr, in_axes: Sequence[list[Axis]]) -> list[list[Axis]]:
    """Interprets an open jaxpr; its constants are fixed. Returns output axes."""
    env = {v: self.fresh(v.aval.shape, fixed=True) for v in jaxpr.constvars}
    env.update(zip(jaxpr.invars, in_axes))
    for eqn in jaxpr.eqns:
      ins = [self.read(env, v) for v in eqn.invars]
      outs = self.equation(eqn, ins)
      env.update(zip(eqn.outvars, outs))
    return [self.read(env, v) for v in jaxpr.outvars]

  def equation(self, eqn, ins: list[list[Axis]]) -> list[list[Axis]]:
    name = eqn.primitive.name
    out_shapes = [v.aval.shape for v in eqn.outvars]
    p = eqn.params
    if name in CALLS and CALLS[name] in p:
      inner = getattr(p[CALLS[name]], "jaxpr", p[CALLS[name]])
      return self.run(inner, ins[len(ins) - len(inner.invars):])
    if name in ELEMENTWISE:
      return [self.elementwise(ins, shape) for shape in out_shapes]
    rule = getattr(self, f"rule_{name}", None)
    if rule is not None:
      return rule(eqn, ins, out_shapes)
    if name not in ("cond", "while", "scan"):
      self.unknown.add(name)
    return self.opaque(ins, out_shapes)

  def opaque(self, ins, out_shapes) -> list[list[Axis]]:
    """Fixes every axis in and out: for what the interpreter cannot see into."""
    self.classes.fix([a for axes in ins for a in axes])
    return [self.fresh(s, fixed=True) for s in out_shapes]

  def elementwise(self, ins: list[list[Axis]], shape: Sequence[int]) -> list[Axis]:
    same_rank = [axes for axes in ins if len(axes) == len(shape)]
    out = []
    for d, size in enumerate(shape):
      present = [axes[d] for axes in same_rank if self.classes.leaves(axes[d])]
      for axis in present[1:]:
        self.classes.unify(present[0], axis)
      out.append(present[0] if present else self.classes.new(size))
    return out

  # Rules, one per primitive: (eqn, input axes, output shapes) -> output axes.

  def rule_broadcast_in_dim(self, eqn, ins, out_shapes):
    (shape,) = out_shapes
    operand = ins[0]
    source = dict(zip(eqn.params["broadcast_dimensions"], operand))
    return [[source[d] if d in source and self.classes.leaves(source[d]) else self.classes.new(s)
             for d, s in enumerate(shape)]]

  def rule_transpose(self, eqn, ins, out_shapes):
    return [[ins[0][d] for d in eqn.params["permutation"]]]

  def rule_squeeze(self, eqn, ins, out_shapes):
    dims = set(eqn.params["dimensions"])
    return [[axis for d, axis in enumerate(ins[0]) if d not in dims]]

  def rule_reshape(self, eqn, ins, out_shapes):
    (shape,) = out_shapes
    if eqn.params.get("dimensions") is not None:
      return self.opaque(ins, out_shapes)
    flat = [n for axis in ins[0] for n in self.classes.leaves(axis)]
    out = []
    for size in shape:
      take, product = [], 1
      while product < size and flat:
        node = flat[0]
        need = size // product
        if size % product or (self.classes.size[node] > need and self.classes.size[node] % need):
          return self.opaque(ins, out_shapes)
        if self.classes.size[node] > need:
          self.classes.split(node, [need, self.classes.size[node] // need])
          flat = self.classes.leaves([node]) + flat[1:]
          continue
        take.append(flat.pop(0))
        product *= self.classes.size[take[-1]]
      if product != size:
        return self.opaque(ins, out_shapes)
      out.append(take)
    return [out]

  def _reduce(self, eqn, ins, out_shapes, fix: bool):
    axes = set(eqn.params["axes"])
    if fix:
      self.classes.fix([ins[0][d] for d in axes])
    kept = [axis for d, axis in enumerate(ins[0]) if d not in axes]
    return [kept for _ in out_shapes]

  def rule_argmax(self, eqn, ins, out_shapes):
    return self._reduce(eqn, ins, out_shapes, fix=True)

  rule_argmin = rule_argmax

  def _cumulative_op(self, eqn, ins, out_shapes):
    self.classes.fix([ins[0][eqn.params["axis"]]])
    return [ins[0]]

  def rule_sort(self, eqn, ins, out_shapes):
    out = self.elementwise(ins, out_shapes[0])
    self.classes.fix([out[eqn.params["dimension"]]])
    return [out for _ in out_shapes]

  def rule_top_k(self, eqn, ins, out_shapes):
    self.classes.fix([ins[0][-1]])
    out = ins[0][:-1] + [self.classes.new(out_shapes[0][-1], fixed=True)]
    return [out, out]

  def rule_concatenate(self, eqn, ins, out_shapes):
    d = eqn.params["dimension"]
    self.classes.fix([axes[d] for axes in ins])
    out = self.elementwise([axes[:d] + axes[d + 1:] for axes in ins], out_shapes[0][:d] + out_shapes[0][d + 1:])
    return [out[:d] + [self.classes.new(out_shapes[0][d], fixed=True)] + out[d:]]

  def _windowed(self, ins, out_shape, whole: Sequence[bool]):
    """Axes kept whole are carried; the others are fixed, in and out."""
    out = []
    for d, (axis, keep) in enumerate(zip(ins[0], whole)):
      if keep:
        out.append(axis)
      else:
        self.classes.fix([axis])
        out.append(self.classes.new(out_shape[d], fixed=True))
    return out

  def rule_pad(self, eqn, ins, out_shapes):
    whole = [cfg == (0, 0, 0) for cfg in eqn.params["padding_config"]]
    return [self._windowed(ins, out_shapes[0], whole)]

  def rule_slice(self, eqn, ins, out_shapes):
    shape = eqn.invars[0].aval.shape
    strides = eqn.params["strides"] or (1,) * len(shape)
    whole = [s == 0 and l == n and st == 1 for s, l, n, st in
             zip(eqn.params["start_indices"], eqn.params["limit_indices"], shape, strides)]
    return [self._windowed(ins, out_shapes[0], whole)]

  def rule_dynamic_slice(self, eqn, ins, out_shapes):
    whole = [a == b for a, b in zip(eqn.invars[0].aval.shape, out_shapes[0])]
    self.classes.fix([a for axes in ins[1:] for a in axes])
    return [self._windowed(ins, out_shapes[0], whole)]

  def rule_dynamic_update_slice(self, eqn, ins, out_shapes):
    operand, update = ins[0], ins[1]
    for d, (a, b) in enumerate(zip(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape)):
      if a == b:
        self.classes.unify(operand[d], update[d])
      else:
        self.classes.fix([operand[d], update[d]])
    self.classes.fix([a for axes in ins[2:] for a in axes])
    return [operand]

  def _pooled(self, eqn, ins, out_shapes):
    """Pooling windows: axes the window spans are fixed, the others carried."""
    p = eqn.params
    whole = [w == 1 and st == 1 and pad == (0, 0) for w, st, pad in
             zip(p["window_dimensions"], p["window_strides"], p["padding"])]
    return [self._windowed(ins, out_shapes[0], whole)]

  rule_reduce_window_max = rule_reduce_window_min = rule_reduce_window_sum = _pooled

  def rule_rev(self, eqn, ins, out_shapes):
    self.classes.fix([ins[0][d] for d in eqn.params["dimensions"]])
    return [ins[0]]

  def rule_split(self, eqn, ins, out_shapes):
    d = eqn.params["axis"]
    self.classes.fix([ins[0][d]])
    return [ins[0][:d] + [self.classes.new(s[d], fixed=True)] + ins[0][d + 1:] for s in out_shapes]

  def rule_iota(self, eqn, ins, out_shapes):
    return [self.fresh(s, fixed=True) for s in out_shapes]

  def rule_dot_general(self, eqn, ins, out_shapes):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    for a, b in zip(lc, rc):
      self.classes.unify(lhs[a], rhs[b])
    for a, b in zip(lb, rb):
      self.classes.unify(lhs[a], rhs[b])
    lhs_free = [axis for d, axis in enumerate(lhs) if d not in lc and d not in lb]
    rhs_free = [axis for d, axis in enumerate(rhs) if d not in rc and d not in rb]
    return [[lhs[d] for d in lb] + lhs_free + rhs_free]

  def rule_conv_general_dilated(self, eqn, ins, out_shapes):
    p = eqn.params
    lhs, rhs = ins
    dn = p["dimension_numbers"]
    if p["batch_group_count"] != 1:
      return self.opaque(ins, out_shapes)
    l_batch, l_feat, *l_space = dn.lhs_spec
    r_out, r_in, *r_space = dn.rhs_spec
    o_batch, o_feat, *o_space = dn.out_spec
    groups = p["feature_group_count"]
    self.classes.fix([lhs[d] for d in l_space] + [rhs[d] for d in r_space])
    out_shape = out_shapes[0]
    out: list[Axis] = [None] * len(out_shape)
    out[o_batch] = lhs[l_batch]
    for d in o_space:
      out[d] = self.classes.new(out_shape[d], fixed=True)
    if groups == 1:
      self.classes.unify(lhs[l_feat], rhs[r_in])
      out[o_feat] = rhs[r_out]
      return [out]
    # Grouped: features are (groups, per-group) on both sides; groups permute
    # as blocks jointly in and out, per-group input units like the kernel's.
    shape_in, shape_k = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    per_in, per_out = shape_in[l_feat] // groups, shape_k[r_out] // groups
    lhs_view = self.classes.new(groups) + self.classes.new(per_in)
    out_view = self.classes.new(groups) + self.classes.new(per_out)
    self.classes.unify(lhs[l_feat], lhs_view)
    self.classes.unify(rhs[r_out], out_view)
    self.classes.union(lhs_view[0], out_view[0])
    self.classes.unify(lhs_view[1:], rhs[r_in])
    out[o_feat] = rhs[r_out]
    return [out]


for _name in INVARIANT_REDUCTIONS:
  setattr(_Interpreter, f"rule_{_name}", lambda self, eqn, ins, outs: self._reduce(eqn, ins, outs, fix=False))
for _name in CUMULATIVE:
  setattr(_Interpreter, f"rule_{_name}", _Interpreter._cumulative_op)


def _paths(tree_: PyTree) -> list[tuple[str, ...]]:
  return list(tree.leaves_by_path(tree_))


def permutation_spec(
    apply_fn: Callable[..., Any], variables: PyTree, *example_args: Any, warn: bool = True
) -> spec_lib.PermutationSpec:
  """The permutation groups of `apply_fn(variables, *example_args)`, traced.

  Args:
    apply_fn: any function JAX can trace, e.g. a Flax `model.apply` (bind
      keyword arguments like `train=False` with a closure), the pure function of
      `nnx.split`, or plain `jax.numpy` code.
    variables: the whole variables tree (arrays or `jax.ShapeDtypeStruct`s).
    *example_args: example inputs (arrays or shapes); only their shapes matter.
    warn: warn naming the primitives the interpreter does not know (which it
      treats as fixing every axis they touch).

  Returns:
    A PermutationSpec whose groups are the variable axes that can be permuted
    together without changing the function; factored axes carry
    `AxisRef.factor`.
  """
  closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(variables, *example_args)
  var_paths = _paths(variables)
  var_shapes = [tuple(x.shape) for x in jax.tree.leaves(variables)]
  arg_shapes = [tuple(x.shape) for x in jax.tree.leaves(example_args)]
  interp = _Interpreter()
  var_axes = [interp.fresh(s) for s in var_shapes]
  arg_axes = [interp.fresh(s, fixed=True) for s in arg_shapes]
  outs = interp.run(closed.jaxpr, var_axes + arg_axes)

  by_path = dict(zip(var_paths, var_axes))
  for out_path, axes in zip(_paths(out_shape), outs):
    match = next((p for p in var_paths if len(p) <= len(out_path) and out_path[-len(p):] == p), None)
    if match is not None and len(by_path[match]) == len(axes):
      for a, b in zip(by_path[match], axes):
        interp.classes.unify(a, b)
    else:
      interp.classes.fix(axes)
  if warn and interp.unknown:
    warnings.warn(
        f"permutation_spec: unknown primitives {sorted(interp.unknown)} fix every axis they touch",
        stacklevel=2,
    )
  return _collect(interp.classes, var_paths, var_axes)


def _collect(classes: _Classes, paths, var_axes) -> spec_lib.PermutationSpec:
  groups: dict[int, list[spec_lib.AxisRef]] = {}
  names: dict[int, str] = {}
  for path, axes in zip(paths, var_axes):
    for d, axis in enumerate(axes):
      nodes = classes.leaves(axis)
      sizes = [classes.size[n] for n in nodes]
      for k, node in enumerate(nodes):
        if classes.is_fixed(node):
          continue
        factor = None
        if len(nodes) > 1:
          outer, inner = math.prod(sizes[:k]), math.prod(sizes[k + 1:])
          view = tuple(s for s in (outer, sizes[k], inner) if s != 1)
          factor = (view, 0 if outer == 1 else 1)
        root = classes.find(node)
        if root not in groups:
          groups[root] = []
          names[root] = f"{tree.path_str(path)}:{d}" + (f"[{k}]" if factor else "")
        groups[root].append(spec_lib.AxisRef(path, d, factor))
  return spec_lib.PermutationSpec(
      {names[r]: refs for r, refs in groups.items()},
      {names[r]: classes.size[r] for r in groups},
  )


def capture(apply_fn: Callable[..., Any]) -> Callable[..., tuple[Any, dict[tuple[str, ...], Any]]]:
  """`apply_fn` that also returns the input each kernel consumed.

      out, feats = capture(model.apply)(variables, x)
      feats[("params", "hidden_1", "kernel")]   # f32[batch, 128]: hidden_0's output

  A kernel is a variable that is an operand of a `dot_general` or a
  `conv_general_dilated` (possibly through a dtype conversion or a call
  boundary); its input is the other operand, as the layer saw it (a
  convolution's un-patched NHWC input, an attention projection's
  `[batch, tokens, embed]`). A kernel used at several call sites maps to the
  tuple of its inputs in call order. The returned function is pure: jit it.

  Args:
    apply_fn: as for `permutation_spec`.

  Returns:
    `(variables, *args) -> (apply_fn(variables, *args), feats)`, feats keyed by
    the kernel's path (a tuple of key names, as in AxisRef.path).
  """

  def captured(variables: PyTree, *args: Any):
    out, uses = kernel_uses(apply_fn)(variables, *args)
    feats = {k: v[0].input if len(v) == 1 else tuple(u.input for u in v) for k, v in uses.items()}
    return out, feats

  return captured


class KernelUse(NamedTuple):
  """One use of a kernel: what it read and produced, and how its axes met them.

  Attributes:
    input: the other operand (the layer's input).
    output: the operation's result.
    input_axes: `(input axis, kernel axis)` pairs that were contracted.
    output_axes: `(output axis, kernel axis)` pairs the kernel's free axes
      became.
    primitive: "dot_general" or "conv_general_dilated".
    params: the operation's parameters (strides, padding, dimension
      numbers...), as the primitive takes them.
  """

  input: Any
  output: Any
  input_axes: tuple[tuple[int, int], ...]
  output_axes: tuple[tuple[int, int], ...]
  primitive: str
  params: Mapping[str, Any]


def kernel_uses(apply_fn: Callable[..., Any]) -> Callable[..., tuple[Any, dict[tuple[str, ...], list[KernelUse]]]]:
  """Like `capture`, with every use of a kernel and the axes it contracted.

  Returns:
    `(variables, *args) -> (out, uses)`, `uses[path]` a list of KernelUse in
    call order; the axis pairs are static Python ints.
  """

  def run(variables: PyTree, *args: Any):
    out, record = _run(apply_fn, variables, args, {})
    return out, record.uses

  return run


def probed_kernel_uses(
    apply_fn: Callable[..., Any],
) -> Callable[..., tuple[Any, dict[tuple[str, ...], list[KernelUse]], frozenset[tuple[str, ...]]]]:
  """`kernel_uses` with a probe added to each use's output, for its cotangent.

      _, uses = kernel_uses(apply_fn)(variables, x)
      probes = {path: [jnp.zeros_like(u.output) for u in us] for path, us in uses.items()}
      fn = probed_kernel_uses(apply_fn)
      out, pullback = jax.vjp(lambda pr: fn(variables, pr, x)[0], probes)
      pullback(out_bar)[0][path][i]  # d out / d (output of the kernel's use i)

  The probes are zeros, so the function's value is unchanged; their gradient
  is the cotangent at each kernel use's output (the `delta` of a layer), from
  which per-example kernel gradients factorise (`mj.fisher`).

  Returns:
    `(variables, probes, *args) -> (out, uses, other_reads)`: `probes[path][i]`
    is added to the output of use i of the kernel at `path` (paths missing
    from `probes` get none); `other_reads` holds the paths of variables read
    other than as a kernel (by an elementwise op, as both operands of a
    product, or returned), whose gradient the kernel uses alone do not give.
  """

  def run(variables: PyTree, probes: Mapping[tuple[str, ...], Sequence[Any]], *args: Any):
    out, record = _run(apply_fn, variables, args, probes)
    return out, record.uses, frozenset(record.other_reads)

  return run


class _Record:
  """What `_evaluate` records: kernel uses, other reads of variables, probes."""

  def __init__(self, probes: Mapping[tuple[str, ...], Sequence[Any]]):
    self.uses: dict[tuple[str, ...], list[KernelUse]] = {}
    self.other_reads: set[tuple[str, ...]] = set()
    self.probes = probes


def _run(apply_fn, variables: PyTree, args: tuple, probes) -> tuple[Any, _Record]:
  closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(variables, *args)
  provenance = _paths(variables) + [None] * len(jax.tree.leaves(args))
  record = _Record(probes)
  values = jax.tree.leaves(variables) + jax.tree.leaves(args)
  outs = _evaluate(closed.jaxpr, closed.consts, values, provenance, record)
  return jax.tree.unflatten(jax.tree.structure(out_shape), outs), record


_PASS_THROUGH = frozenset(["convert_element_type", "copy", "copy_p"])


def _kernel_axes(eqn, kernel_is_lhs: bool) -> tuple[tuple, tuple]:
  """(input axis, kernel axis) contracted and (output axis, kernel axis) pairs."""
  p = eqn.params
  if eqn.primitive.name == "conv_general_dilated":
    dn = p["dimension_numbers"]
    return ((dn.lhs_spec[1], dn.rhs_spec[1]),), ((dn.out_spec[1], dn.rhs_spec[0]),)
  (lc, rc), (lb, rb) = p["dimension_numbers"]
  ranks = [len(v.aval.shape) for v in eqn.invars]
  lhs_free = [d for d in range(ranks[0]) if d not in lc and d not in lb]
  rhs_free = [d for d in range(ranks[1]) if d not in rc and d not in rb]
  if kernel_is_lhs:
    contracted = tuple(zip(rc, lc))
    out = tuple((len(lb) + i, d) for i, d in enumerate(lhs_free))
  else:
    contracted = tuple(zip(lc, rc))
    out = tuple((len(lb) + len(lhs_free) + i, d) for i, d in enumerate(rhs_free))
  return contracted, out


def _evaluate(jaxpr, consts, args, provenance, record: _Record) -> list:
  """Evaluates a jaxpr, recording kernels' uses; recurses into calls."""
  env, origin = {}, {}
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  origin.update(zip(jaxpr.invars, provenance))

  def read(atom):
    return atom.val if isinstance(atom, jex_core.Literal) else env[atom]

  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    sources = [None if isinstance(v, jex_core.Literal) else origin.get(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in CALLS and CALLS[name] in eqn.params and any(sources):
      # Interpreted inside only where variables flow in: elsewhere the call is
      # bound as it is, so custom derivative rules (relu's at 0) still hold.
      inner = eqn.params[CALLS[name]]
      inner_jaxpr = getattr(inner, "jaxpr", inner)
      n = len(inner_jaxpr.invars)
      record.other_reads.update(s for s in sources[:-n] if s)
      outs = _evaluate(inner_jaxpr, getattr(inner, "consts", []), values[-n:], sources[-n:], record)
      env.update(zip(eqn.outvars, outs))
      continue
    with eqn.ctx.manager:
      outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
    outs = outs if eqn.primitive.multiple_results else [outs]
    kernel_is_lhs = name == "dot_general" and bool(sources[0])
    if (name == "dot_general" and bool(sources[0]) != bool(sources[1])) or (
        name == "conv_general_dilated" and sources[1] and not sources[0]):
      contracted, produced = _kernel_axes(eqn, kernel_is_lhs)
      kernel = sources[0] if kernel_is_lhs else sources[1]
      data = values[1] if kernel_is_lhs else values[0]
      kernel_uses_ = record.uses.setdefault(kernel, [])
      if kernel in record.probes:
        outs[0] = outs[0] + record.probes[kernel][len(kernel_uses_)]
      kernel_uses_.append(KernelUse(data, outs[0], contracted, produced, name, dict(eqn.params)))
    elif name in _PASS_THROUGH and sources[0]:
      origin[eqn.outvars[0]] = sources[0]
    else:
      record.other_reads.update(s for s in sources if s)
    env.update(zip(eqn.outvars, outs))
  record.other_reads.update(origin[v] for v in jaxpr.outvars
                            if not isinstance(v, jex_core.Literal) and origin.get(v))
  return [read(v) for v in jaxpr.outvars]
