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

A `split`, contiguous `slice` or `concatenate` cuts a class into consecutive
parts instead (q | k | v of a fused projection), which come out as
`AxisRef.part`. So does a reshape whose new outer axis the jaxpr only ever
indexes, through transposes, one index at a time (`qkv.reshape(b, t, 3, h,
hd)` then `qkv[:, :, 0]`, `jnp.unstack`, or `jnp.moveaxis` and unpacking): it
is read as a split, each index one part with components of its own; an
indexed reshape not read so (its value leaves the jaxpr it is made in) keeps
one set of inner components for all its parts and is named in the warning.
A `gather` that takes an axis whole passes it on (embedding tables join the
residual stream); `cond` joins its branches' constraints.

Fixed are the example arguments, the function's outputs (except outputs that
are variables, like BatchNorm statistics under `mutable`), literals, `iota`,
the axes along which a closed-over constant array varies (one it is alike
along is a broadcast, free), and every axis an operation does not treat
alike for all its units: the
spatial window of a convolution, reductions other than sum/max/min/prod/and/
or, cumulative ops, sorts, strided slices, pads, reversals, indexed axes of
gathers, and `while`. What fixes variable axes beyond the function's
structure (arguments, outputs, literals, `iota`, windows, looked-up axes) is named
in one warning with the variables concerned, as are variables never read
(which are in no group) and primitives the interpreter does not know (which
fix every axis they touch): a coverage gap is visible, never unsound
(`spec_report` gives the same as data). Every equation that carries a jaxpr
(`pjit`, `remat2`, `custom_jvp_call`, `custom_vjp_call`, `closed_call`) is
interpreted inside, in a scope of its own per call site.

A `scan`'s body is interpreted once, its carry out joined with its carry in.
The classes it touches through the carry, a const or any outer value are
one permutation for the whole loop; a class made only of the body's values
and the axes of variables the scan iterates over (read by nothing else) is
a *batched* group, one permutation per iteration (`AxisRef.batch = 0`):
the per-layer groups of a scanned stack of layers.

The groups are the classes that hold at least one variable axis, no fixed
axis, and more than one unit. Group names are deterministic: the first
AxisRef's path and axis, in the variables' flattening order.
"""

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any, NamedTuple
import warnings

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import numpy as np

from mergejax import spec as spec_lib
from mergejax import tap_convolution
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

# The `SpecReport.fixed_by` key of an indexed reshape that is not read as a
# split (`_indexed_reshapes`): the parts share their inner components, and the
# outer one (the part index) is fixed.
_INDEXED_WHOLE = "an index of a reshaped axis not read as parts (they share their inner groups)"


class _Classes:
  """Union-find over axis components, with class-wide splits and fixing.

  A component (node) is a leaf of the union-find, or split class-wide in one
  of two ways: into a product of components (`children`, row-major: a
  reshape's view, heads x head_dim) or into consecutive parts (`parts`: a
  `split`, `slice` or `concatenate` of the axis, q | k | v of a fused
  projection). Every member of a class is split alike, corresponding pieces
  joined. `events` records what fixed which nodes (None: structure, e.g.
  arguments, outputs, literals; else the construct), for the warning.
  """

  def __init__(self):
    self.parent: list[int] = []
    self.size: list[int] = []
    self.children: dict[int, list[int]] = {}
    self.product: dict[int, int] = {}  # component -> the node split into it (inverse of children)
    self.parts: dict[int, list[tuple[int, Axis]]] = {}  # node -> [(size, part's axis)]
    self.members: dict[int, list[int]] = {}
    self.fixed: set[int] = set()  # roots
    self.events: list[tuple[str | None, list[int]]] = []
    self.owner: list[int] = []  # node -> the scope (scan body) whose value it is an axis of
    self.scope = 0  # the scope new axes belong to

  def new(self, size: int, fixed: bool = False, why: str | None = None, owner: int | None = None) -> list[int]:
    """A fresh axis of `size` units: one component, or none when size is 0 or 1.

    Its owner is the current scope, or `owner` (the pieces of a split axis
    belong to the value the axis belongs to).
    """
    if size <= 1:
      return []
    node = len(self.parent)
    self.parent.append(node)
    self.size.append(size)
    self.owner.append(self.scope if owner is None else owner)
    self.members[node] = [node]
    if fixed:
      self.fixed.add(node)
      self.events.append((why, [node]))
    return [node]

  def find(self, node: int) -> int:
    root = node
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[node] != root:
      self.parent[node], node = root, self.parent[node]
    return root

  def leaves(self, axis: Sequence[int]) -> Axis:
    """The current components of an axis (product splits expanded; a node cut in parts stays)."""
    out = []
    for node in axis:
      out.extend(self.leaves(self.children[node]) if node in self.children else [node])
    return out

  def outer_component(self, axis: Axis) -> int | None:
    """The axis's node where it is one component of a product, not its innermost; else None."""
    if len(axis) != 1 or axis[0] not in self.product:
      return None
    siblings = self.children[self.product[axis[0]]]
    return axis[0] if siblings.index(axis[0]) < len(siblings) - 1 else None

  def current(self, node: int) -> list[int]:
    """Every union-find leaf below `node`, through both kinds of split."""
    if node in self.children:
      return [m for c in self.children[node] for m in self.current(c)]
    if node in self.parts:
      return [m for _, p in self.parts[node] for c in p for m in self.current(c)]
    return [node]

  def flat_parts(self, node: int) -> list[tuple[int, Axis]]:
    """`node`'s consecutive parts, parts that are themselves cut in parts expanded."""
    out = []
    for size, p in self.parts[node]:
      out.extend(self.flat_parts(p[0]) if len(p) == 1 and p[0] in self.parts else [(size, p)])
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

  def fix(self, axes: Sequence[Sequence[int]], why: str | None = None) -> None:
    """Fixes every unit of `axes`; `why` names the construct (None: structure)."""
    nodes = [n for axis in axes for n in axis]
    if nodes:
      self.events.append((why, nodes))
    for n in nodes:
      for m in self.current(n):
        self.fixed.add(self.find(m))

  def _reassign(self, node: int, sizes: Sequence[int], concatenated: bool) -> None:
    root = self.find(node)
    fixed = root in self.fixed
    members = self.members.pop(root)
    self.fixed.discard(root)
    first = None
    for m in members:
      if concatenated:
        parts = [(s, self.new(s, owner=self.owner[m])) for s in sizes]
        self.parts[m] = parts
        flat = [c for _, p in parts for c in p]
      else:
        flat = [c for s in sizes for c in self.new(s, owner=self.owner[m])]
        self.children[m] = flat
        self.product.update((c, m) for c in flat)
      if first is None:
        first = flat
      else:
        for p, q in zip(first, flat):
          self.union(p, q)
    if fixed:
      self.fixed.update(self.find(c) for c in first)

  def split(self, node: int, sizes: Sequence[int]) -> None:
    """Splits `node`'s whole class into components of `sizes` (row-major)."""
    self._reassign(node, sizes, concatenated=False)

  def cat(self, node: int, sizes: Sequence[int]) -> None:
    """Cuts `node`'s whole class into consecutive parts of `sizes` (none 0)."""
    self._reassign(node, sizes, concatenated=True)

  def _refine(self, node: int, bounds: Sequence[int]) -> bool:
    """Cuts `node`'s parts at `bounds` (offsets in it); False where a part has components."""
    while True:
      offset, changed = 0, False
      for size, p in self.flat_parts(node):
        inner = [b - offset for b in bounds if offset < b < offset + size]
        if inner:
          if len(p) != 1 or p[0] in self.children:
            return False
          edges = [0, *sorted(set(inner)), size]
          self.cat(p[0], [b - a for a, b in zip(edges, edges[1:])])
          changed = True
          break
        offset += size
      if not changed:
        return True

  def cut(self, axis: Axis, sizes: Sequence[int]) -> list[Axis] | None:
    """`axis` as consecutive parts of `sizes`, cutting its class; None where its components do not allow."""
    keep = [s for s in sizes if s > 0]
    found = self._cut_parts(axis, keep) if len(keep) > 1 else [axis]
    if found is None:
      return None
    it = iter(found)
    return [next(it) if s > 0 else [] for s in sizes]

  def _cut_parts(self, axis: Axis, sizes: Sequence[int]) -> list[Axis] | None:
    nodes = self.leaves(axis)
    if not nodes:
      return [[] for _ in sizes]
    if len(nodes) > 1:  # a product: cut its outer component, the inner ones shared by all parts
      inner = math.prod(self.size[n] for n in nodes[1:])
      if any(s % inner for s in sizes):
        return None
      outer = self._cut_parts([nodes[0]], [s // inner for s in sizes])
      return None if outer is None else [p + nodes[1:] for p in outer]
    (node,) = nodes
    if node not in self.parts:
      self.cat(node, sizes)
      return [p for _, p in self.parts[node]]
    if not self._refine(node, _cumulative_sum(sizes)[:-1]):
      return None
    parts, out = iter(self.flat_parts(node)), []
    for s in sizes:
      group, total = [], 0
      while total < s:
        size, p = next(parts)
        group.append((size, p))
        total += size
      if len(group) == 1:
        out.append(group[0][1])
      else:  # several parts make this one: a fresh node cut like them, joined with them
        fresh = self.new(s)
        self.cat(fresh[0], [size for size, _ in group])
        for (_, a), (_, b) in zip(self.parts[fresh[0]], group):
          self.unify(a, b)
        out.append(fresh)
    return out

  def unify(self, a: Sequence[int], b: Sequence[int]) -> None:
    """Joins two axes of equal size, refining their components to agree."""
    while True:
      la, lb = self.leaves(a), self.leaves(b)
      sa, sb = [self.size[n] for n in la], [self.size[n] for n in lb]
      if sa == sb:
        for x, y in zip(la, lb):
          self._unify_nodes(x, y)
        return
      cuts = sorted(set(_cumulative(sa)) | set(_cumulative(sb)))
      if any(b % a for a, b in zip(cuts, cuts[1:])):
        self.fix([la, lb], "reshape")  # views that no common refinement reconciles
        return
      done = self._cut(la, cuts) or self._cut(lb, cuts)
      if done is None:
        self.fix([la, lb], "reshape")  # a product view of an axis cut in parts
        return

  def _unify_nodes(self, x: int, y: int) -> None:
    if x == y:
      return
    if x not in self.parts and y not in self.parts:
      self.union(x, y)
      return
    if x not in self.parts:
      x, y = y, x
    if y not in self.parts:
      self.cat(y, [s for s, _ in self.flat_parts(x)])
    else:
      bounds = sorted(set(_cumulative_sum([s for s, _ in self.flat_parts(x)]))
                      | set(_cumulative_sum([s for s, _ in self.flat_parts(y)])))
      if not (self._refine(x, bounds) and self._refine(y, bounds)):
        self.fix([[x], [y]], "reshape")
        return
    for (_, p), (_, q) in zip(self.flat_parts(x), self.flat_parts(y)):
      self.unify(p, q)

  def _cut(self, axis: Axis, cuts: Sequence[int]) -> bool | None:
    """Splits the first component of `axis` that straddles a cut; True if any, None if it is cut in parts."""
    start = 1
    for node in axis:
      end = start * self.size[node]
      inner = [c for c in cuts if start < c < end]
      if inner:
        if node in self.parts:
          return None
        bounds = [start, *inner, end]
        self.split(node, [b // a for a, b in zip(bounds, bounds[1:])])
        return True
      start = end
    return False


def _outer_factors(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[tuple[int, int]]:
  """`(a, d)`: output axis a is the outer factor of input axis d, which the reshape splits."""
  if 0 in in_shape or 0 in out_shape:
    return []
  out, i, j = [], 0, 0
  while i < len(in_shape) and j < len(out_shape):
    pi, pj, i2, j2 = in_shape[i], out_shape[j], i + 1, j + 1
    while pi != pj:
      if pi < pj:
        pi, i2 = pi * in_shape[i2], i2 + 1
      else:
        pj, j2 = pj * out_shape[j2], j2 + 1
    if i2 - i == 1 and j2 - j > 1 and 1 < out_shape[j] < in_shape[i]:
      out.append((j, i))
    i, j = i2, j2
  return out


def _indexed_reshapes(jaxpr) -> dict[Any, tuple[int, int]]:
  """Reshapes whose new outer axis is only ever indexed: outvar -> `(a, d)` (`_outer_factors`).

  Indexed: every use of the value, through transposes, is a `slice` of one
  index on that axis (the rest whole) or an `unstack` along it
  (`qkv[..., 0, :, :]`, `q, k, v = jnp.moveaxis(qkv, -3, 0)`). Such a
  reshape is a split in disguise (`_Interpreter.indexed_reshape`); a value
  the jaxpr returns is not, its uses being unknown.
  """
  uses: dict[Any, list] = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if not isinstance(v, jex_core.Literal):
        uses.setdefault(v, []).append(eqn)
  returned = {v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal)}

  def indexed(value, a: int) -> bool:
    if value in returned:
      return False
    for eqn in uses.get(value, []):
      name, p = eqn.primitive.name, eqn.params
      if name == "transpose":
        ok = indexed(eqn.outvars[0], list(p["permutation"]).index(a))
      elif name == "unstack":
        ok = p["axis"] == a
      elif name == "slice":
        shape = value.aval.shape
        ok = (all(st == 1 for st in p["strides"] or ()) and p["limit_indices"][a] - p["start_indices"][a] == 1
              and all((s, l) == (0, n) for d, (s, l, n) in enumerate(zip(p["start_indices"], p["limit_indices"],
                                                                        shape)) if d != a))
      else:
        ok = False
      if not ok:
        return False
    return True

  plan = {}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name != "reshape" or eqn.params.get("dimensions") is not None:
      continue
    out = eqn.outvars[0]
    for a, d in _outer_factors(eqn.invars[0].aval.shape, out.aval.shape):
      if indexed(out, a):
        plan[out] = (a, d)
        break
  return plan


def _cumulative(sizes: Sequence[int]) -> list[int]:
  out, p = [], 1
  for s in sizes:
    p *= s
    out.append(p)
  return out


def _cumulative_sum(sizes: Sequence[int]) -> list[int]:
  out, total = [], 0
  for s in sizes:
    total += s
    out.append(total)
  return out


class _Scan(NamedTuple):
  """What a `scan` equation left for `_Interpreter.batched`.

  Attributes:
    scope: the scope of its body's values (`_Classes.owner`).
    length: its number of iterations L.
    xs: the variables it scans over directly (their own top-level axes as
      xs operands), by index.
    outputs: the union-find nodes of its per-iteration outputs (ys), which
      leave the loop stacked.
  """

  scope: int
  length: int
  xs: tuple[int, ...]
  outputs: tuple[int, ...]


class _Interpreter:
  """Abstract interpretation of a jaxpr over axis classes."""

  def __init__(self):
    self.classes = _Classes()
    self.var_axes: list[list[Axis]] = []  # each variable's own axes, as created (set by spec_report)
    self.unknown: set[str] = set()
    self.read: set[int] = set()  # indices of the variables some equation reads
    self.reads: dict[int, int] = {}  # variable index -> equations reading it (a scan's consts: its body's)
    self.scans: list[_Scan] = []
    self.scope_parent: dict[int, int] = {}  # scan body scope -> the scope it runs in
    self.srcs: list[int | None] = []  # the current equation's operands: variable index or None
    self.selected: list[Axis] = []  # parts of axes that a slice or split takes
    self.indexed_outer: list[int] = []  # outer product components indexed as a whole value (not as parts)
    self.dropped: list[Axis] = []  # parts a slice leaves out

  def fresh(self, shape: Sequence[int], fixed: bool = False, why: str | None = None) -> list[Axis]:
    return [self.classes.new(d, fixed, why) for d in shape]

  def constant(self, shape: Sequence[int], value: Any | None) -> list[Axis]:
    """A constant's axes: fixed ("a constant array"), but for those its known `value` is alike along
    (a value is known unless traced or spread over other processes)."""
    if isinstance(value, jax.core.Tracer) or (isinstance(value, jax.Array) and not value.is_fully_addressable):
      value = None
    value = None if value is None else np.asarray(value)
    return [self.classes.new(d, value is None or not _alike_along(value, a), "a constant array")
            for a, d in enumerate(shape)]

  def value(self, env: dict, atom) -> list[Axis]:
    if isinstance(atom, jex_core.Literal):
      return self.fresh(getattr(atom.aval, "shape", ()), fixed=True)
    return env[atom]

  def run(self, jaxpr, in_axes: Sequence[list[Axis]], in_srcs: Sequence[int | None] | None = None,
          consts: Sequence[Any] | None = None) -> list[list[Axis]]:
    """Interprets an open jaxpr; its constants are fixed (with their values `consts`, only the axes along
    which a value varies: a constant alike along an axis is that axis broadcast). Returns output axes."""
    values = consts if consts is not None else [None] * len(jaxpr.constvars)
    env = {v: self.constant(v.aval.shape, c) for v, c in zip(jaxpr.constvars, values)}
    env.update(zip(jaxpr.invars, in_axes))
    src = {v: s for v, s in zip(jaxpr.invars, in_srcs or ()) if s is not None}
    plan = _indexed_reshapes(jaxpr)
    stacks: dict[Any, tuple[int, list[list[Axis]]]] = {}
    for eqn in jaxpr.eqns:
      srcs = [None if isinstance(v, jex_core.Literal) else src.get(v) for v in eqn.invars]
      if self.stacked(eqn, env, srcs, plan, stacks):
        continue
      ins = [self.value(env, v) for v in eqn.invars]
      outs = self.equation(eqn, ins, srcs)
      env.update(zip(eqn.outvars, outs))
      if eqn.primitive.name in _PASS_THROUGH and srcs[0] is not None:
        src[eqn.outvars[0]] = srcs[0]
    returned = [src[v] for v in jaxpr.outvars if not isinstance(v, jex_core.Literal) and v in src]
    self.read.update(returned)
    self.count_reads(returned)
    return [self.value(env, v) for v in jaxpr.outvars]

  def stacked(self, eqn, env: dict, srcs, plan: Mapping[Any, tuple[int, int]],
              stacks: dict[Any, tuple[int, list[list[Axis]]]]) -> bool:
    """Steps a reshape in `plan` and the transposes and indexes of its value; False for any other equation.

    `stacks[value] = (a, views)`: the value is views[i] at index i of its
    axis a (views without axis a); it is only ever transposed and indexed
    on a (`_indexed_reshapes`), so it needs no axes of its own.
    """
    out = eqn.outvars[0] if eqn.outvars else None
    if out in plan:
      self.srcs = srcs
      views = self.indexed_reshape(eqn, [self.value(env, eqn.invars[0])], plan[out])
      if views is not None:
        stacks[out] = (plan[out][0], views)
      return views is not None
    operand = eqn.invars[0] if eqn.invars else None
    if operand is None or isinstance(operand, jex_core.Literal) or operand not in stacks:
      return False
    a, views = stacks[operand]
    name = eqn.primitive.name
    if name == "transpose":
      perm = list(eqn.params["permutation"])
      b = perm.index(a)
      full = [[(v[:a] + [[]] + v[a:])[p] for p in perm] for v in views]
      stacks[out] = (b, [f[:b] + f[b + 1:] for f in full])
    elif name == "slice":
      view = views[eqn.params["start_indices"][a]]
      env[out] = view[:a] + [[]] + view[a:]
    else:  # unstack
      env.update(zip(eqn.outvars, views))
    return True

  def count_reads(self, srcs: Sequence[int | None]) -> None:
    for s in srcs:
      if s is not None:
        self.reads[s] = self.reads.get(s, 0) + 1

  def equation(self, eqn, ins: list[list[Axis]], srcs: list[int | None]) -> list[list[Axis]]:
    name = eqn.primitive.name
    out_shapes = [v.aval.shape for v in eqn.outvars]
    p = eqn.params
    if name in CALLS and CALLS[name] in p:
      closed = p[CALLS[name]]
      inner = getattr(closed, "jaxpr", closed)
      n = len(inner.invars)
      self.read.update(s for s in srcs[:len(ins) - n] if s is not None)
      self.count_reads(srcs[:len(ins) - n])
      return self.run(inner, ins[len(ins) - n:], srcs[len(ins) - n:], getattr(closed, "consts", None))
    if name == "cond":
      return self.cond(eqn, ins, srcs)
    if name == "scan":
      return self.scan(eqn, ins, srcs)
    self.read.update(s for s in srcs if s is not None)
    if name not in _PASS_THROUGH:  # a cast of a variable is the variable (run() follows it)
      self.count_reads(srcs)
    self.srcs = srcs
    if name in ELEMENTWISE:
      return [self.elementwise(ins, shape) for shape in out_shapes]
    rule = getattr(self, f"rule_{name}", None)
    if rule is not None:
      return rule(eqn, ins, out_shapes)
    if name != "while":
      self.unknown.add(name)
    return self.opaque(ins, out_shapes, name)

  def scan(self, eqn, ins, srcs) -> list[list[Axis]]:
    """The body interpreted once, in a scope of its own; carry out joined with carry in.

    Operands are consts, carry, xs (sliced on axis 0, the copies' axis, fixed
    as structure); outputs carry, ys (stacked on a fixed new axis 0). The
    body reads the consts (their reads are counted there). Which classes
    may take one permutation per iteration is decided at the end
    (`batched`), when every constraint is known.
    """
    p = eqn.params
    nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
    self.read.update(s for s in srcs if s is not None)
    self.count_reads(srcs[nc:])
    xs = ins[nc + nk:]
    self.classes.fix([axes[0] for axes in xs])
    outer = self.classes.scope
    scope = len(self.scope_parent) + 1
    self.scope_parent[scope] = outer
    self.classes.scope = scope
    body = p["jaxpr"]
    outs = self.run(body.jaxpr, ins[:nc + nk] + [axes[1:] for axes in xs], srcs[:nc] + [None] * (len(ins) - nc),
                    body.consts)
    self.classes.scope = outer
    carry, ys = ins[nc:nc + nk], outs[nk:]
    for before, after in zip(carry, outs[:nk]):
      for a, b in zip(before, after):
        self.classes.unify(a, b)
    stacked = tuple(v for v, axes in zip(srcs[nc + nk:], xs)
                    if v is not None and axes == self.var_axes[v] and len(axes) > 1)
    leaving = tuple(m for y in ys for axis in y for n in axis for m in self.classes.current(n))
    self.scans.append(_Scan(scope, length, stacked, leaving))
    return [list(a) for a in carry] + [[self.classes.new(length, fixed=True)] + y for y in ys]

  def _within(self, scope: int, outer: int) -> bool:
    while scope != outer and scope in self.scope_parent:
      scope = self.scope_parent[scope]
    return scope == outer

  def batched(self) -> tuple[dict[int, int], dict[int, str]]:
    """The classes that take one permutation per iteration of a scan, and the scanned variables that do not.

    A class is batched under a scan when it is not fixed, none of its
    members leaves the loop in ys, and every member is an axis of a value of
    the body (or of a loop nested in it) or an axis (not 0) of a variable the
    scan iterates over directly and nothing else reads: then each iteration
    computes alike for any permutation of the class, independently of the
    others. Classes that touch the carry, a const or anything outside are
    one permutation for the whole loop (the body's constraints were joined
    with theirs).

    Returns:
      `(root -> L of every batched class, variable index -> why its copies
      share one permutation)` for scanned variables read elsewhere too, or
      whose classes ys carry out of the loop.
    """
    c = self.classes
    out: dict[int, int] = {}
    shared: dict[int, str] = {}
    for scan in self.scans:
      for v in scan.xs:
        if self.reads.get(v, 0) > 1:
          shared.setdefault(v, "read outside the loop")
      own = [v for v in scan.xs if self.reads.get(v, 0) == 1]
      allowed = {m for v in own for axis in self.var_axes[v][1:] for n in axis for m in c.current(n)}
      leaving = {c.find(m) for m in scan.outputs}
      for m in allowed:
        root = c.find(m)
        if root in out or root in c.fixed:
          continue
        local = all(x in allowed or self._within(c.owner[x], scan.scope) for x in c.members[root])
        if local and root in leaving:
          for v in own:
            if any(c.find(x) == root for axis in self.var_axes[v][1:] for n in axis for x in c.current(n)):
              shared.setdefault(v, "carried out of the loop by ys")
        elif local:
          out[root] = scan.length
    return out, shared

  def cond(self, eqn, ins, srcs) -> list[list[Axis]]:
    """Every branch interpreted on the same operands; their outputs joined."""
    if srcs[0] is not None:
      self.read.add(srcs[0])
    self.classes.fix(ins[0])
    outs = None
    for branch in eqn.params["branches"]:
      got = self.run(branch.jaxpr, ins[1:], srcs[1:], branch.consts)
      if outs is None:
        outs = got
        continue
      for x, y in zip(outs, got):
        for a, b in zip(x, y):
          self.classes.unify(a, b)
    return outs

  def opaque(self, ins, out_shapes, why: str | None) -> list[list[Axis]]:
    """Fixes every axis in and out: for what the interpreter cannot see into."""
    self.classes.fix([a for axes in ins for a in axes], why)
    return [self.fresh(s, True, why) for s in out_shapes]

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
    out = None if eqn.params.get("dimensions") is not None else self._reshaped(ins[0], out_shapes[0])
    return self.opaque(ins, out_shapes, "reshape") if out is None else [out]

  def _reshaped(self, axes: list[Axis], shape: Sequence[int]) -> list[Axis] | None:
    """`axes` viewed as `shape` (row-major), splitting components class-wide; None where no view fits."""
    flat = [n for axis in axes for n in self.classes.leaves(axis)]
    out = []
    for size in shape:
      take, product = [], 1
      while product < size and flat:
        node = flat[0]
        need = size // product
        big = self.classes.size[node] > need
        if size % product or (big and (self.classes.size[node] % need or node in self.classes.parts)):
          return None
        if big:
          self.classes.split(node, [need, self.classes.size[node] // need])
          flat = self.classes.leaves([node]) + flat[1:]
          continue
        take.append(flat.pop(0))
        product *= self.classes.size[take[-1]]
      if product != size:
        return None
      out.append(take)
    return out

  def indexed_reshape(self, eqn, ins, where: tuple[int, int]) -> list[list[Axis]] | None:
    """A reshape whose new outer axis is only ever indexed, as a split: its parts' axes, or None.

    `where = (a, d)`: output axis a is the outer factor of input axis d
    (`[b, t, 3 * h * hd] -> [b, t, 3, h, hd]`, a = 2, d = 2). Input axis d
    is cut in a's size of equal parts (class-wide, like `split`), each part
    viewed as the output's other axes: index i of axis a is part i, so each
    of q, k, v gets components of its own (`AxisRef.part` with a factor).
    Returns each part's axes (the output's axes but a); None (nothing
    changed) where the axis's components do not allow the cut.
    """
    a, d = where
    shape = eqn.outvars[0].aval.shape
    n = eqn.invars[0].aval.shape[d] // shape[a]
    parts = self.classes.cut(ins[0][d], [n] * shape[a])
    if parts is None:
      return None
    self.read.update(s for s in self.srcs if s is not None)
    self.count_reads(self.srcs)
    views = [self._reshaped(ins[0][:d] + [part] + ins[0][d + 1:], shape[:a] + shape[a + 1:]) for part in parts]
    if any(v is None for v in views):
      self.opaque(ins, [], "reshape")
      return [self.fresh(shape[:a] + shape[a + 1:], True, "reshape") for _ in parts]
    return views

  def _reduce(self, eqn, ins, out_shapes, why: str | None):
    axes = set(eqn.params["axes"])
    if why:
      self.classes.fix([ins[0][d] for d in axes], why)
    kept = [axis for d, axis in enumerate(ins[0]) if d not in axes]
    return [kept for _ in out_shapes]

  def rule_argmax(self, eqn, ins, out_shapes):
    return self._reduce(eqn, ins, out_shapes, eqn.primitive.name)

  rule_argmin = rule_argmax

  def _cumulative_op(self, eqn, ins, out_shapes):
    self.classes.fix([ins[0][eqn.params["axis"]]], eqn.primitive.name)
    return [ins[0]]

  def rule_sort(self, eqn, ins, out_shapes):
    out = self.elementwise(ins, out_shapes[0])
    self.classes.fix([out[eqn.params["dimension"]]], "sort")
    return [out for _ in out_shapes]

  def rule_top_k(self, eqn, ins, out_shapes):
    self.classes.fix([ins[0][-1]], "top_k")
    out = ins[0][:-1] + [self.classes.new(out_shapes[0][-1], True, "top_k")]
    return [out, out]

  def rule_concatenate(self, eqn, ins, out_shapes):
    """The output's axis is cut in parts, each joined with its operand's axis."""
    d = eqn.params["dimension"]
    out = self.elementwise([axes[:d] + axes[d + 1:] for axes in ins], out_shapes[0][:d] + out_shapes[0][d + 1:])
    sizes = [v.aval.shape[d] for v in eqn.invars]
    joined = self.classes.new(out_shapes[0][d])
    used = [(s, axes[d]) for s, axes in zip(sizes, ins) if s > 0]
    if joined and len(used) > 1:
      self.classes.cat(joined[0], [s for s, _ in used])
      for (_, part), (_, axis) in zip(self.classes.parts[joined[0]], used):
        self.classes.unify(part, axis)
    elif joined:
      self.classes.unify(joined, used[0][1])
    return [out[:d] + [joined] + out[d:]]

  def _windowed(self, ins, out_shape, whole: Sequence[bool], why: str | None):
    """Axes kept whole are carried; the others are fixed, in and out."""
    out = []
    for d, (axis, keep) in enumerate(zip(ins[0], whole)):
      if keep:
        out.append(axis)
      else:
        self.classes.fix([axis], why)
        out.append(self.classes.new(out_shape[d], True, why))
    return out

  def rule_pad(self, eqn, ins, out_shapes):
    whole = [cfg == (0, 0, 0) for cfg in eqn.params["padding_config"]]
    return [self._windowed(ins, out_shapes[0], whole, "pad")]

  def rule_slice(self, eqn, ins, out_shapes):
    """A contiguous slice cuts the axis in parts and takes one; strided slices fix it."""
    shape = eqn.invars[0].aval.shape
    strides = eqn.params["strides"] or (1,) * len(shape)
    out = []
    for d, (axis, s, l, n, st) in enumerate(
        zip(ins[0], eqn.params["start_indices"], eqn.params["limit_indices"], shape, strides)):
      if s == 0 and l == n and st == 1:
        out.append(axis)
        continue
      outer = self.classes.outer_component(self.classes.leaves(axis))
      if l - s == 1 and outer is not None:
        self.indexed_outer.append(outer)
      parts = self.classes.cut(axis, [s, l - s, n - l]) if st == 1 else None
      if parts is None:
        self.classes.fix([axis], "slice")
        out.append(self.classes.new(out_shapes[0][d], True, "slice"))
        continue
      self.dropped += [parts[0], parts[2]]
      self.selected.append(parts[1])
      out.append(parts[1])
    return [out]

  def rule_split(self, eqn, ins, out_shapes):
    d = eqn.params["axis"]
    parts = self.classes.cut(ins[0][d], [s[d] for s in out_shapes])
    if parts is None:
      self.classes.fix([ins[0][d]], "split")
      parts = [self.classes.new(s[d], True, "split") for s in out_shapes]
    self.selected.extend(parts)
    return [ins[0][:d] + [part] + ins[0][d + 1:] for part in parts]

  def rule_unstack(self, eqn, ins, out_shapes):
    d = eqn.params["axis"]
    outer = self.classes.outer_component(self.classes.leaves(ins[0][d]))
    if outer is not None:
      self.indexed_outer.append(outer)
    self.classes.fix([ins[0][d]])  # each output is one index of it, as a slice and squeeze
    return [ins[0][:d] + ins[0][d + 1:] for _ in out_shapes]

  def rule_gather(self, eqn, ins, out_shapes):
    """Axes taken whole and not indexed pass to their output axes; all others are fixed.

    A lookup of a variable (`E[ids]`, `jnp.take(E, ids, axis=0)`, `nn.Embed`):
    its indexed axes are fixed by the data, like an argument's, without a
    warning; any other gather's fixed axes are named in it.
    """
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    operand, indices = ins
    shape = eqn.invars[0].aval.shape
    not_offset = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    offset_axes = [a for a in range(len(shape)) if a not in not_offset]
    passed = {a for a in offset_axes if sizes[a] == shape[a] and a not in dn.start_index_map}
    lookup = (self.srcs[0] is not None and not dn.operand_batching_dims
              and set(dn.start_index_map) == set(dn.collapsed_slice_dims)
              and all(a in passed for a in offset_axes))
    why = None if lookup else "gather"
    self.classes.fix([operand[a] for a in range(len(shape)) if a not in passed], why)
    self.classes.fix(indices)
    out = self.fresh(out_shapes[0], True, why)
    for a, o in zip(offset_axes, dn.offset_dims):
      if a in passed:
        out[o] = operand[a]
    return [out]

  def rule_dynamic_slice(self, eqn, ins, out_shapes):
    whole = [a == b for a, b in zip(eqn.invars[0].aval.shape, out_shapes[0])]
    self.classes.fix([a for axes in ins[1:] for a in axes])
    return [self._windowed(ins, out_shapes[0], whole, "dynamic_slice")]

  def rule_dynamic_update_slice(self, eqn, ins, out_shapes):
    operand, update = ins[0], ins[1]
    for d, (a, b) in enumerate(zip(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape)):
      if a == b:
        self.classes.unify(operand[d], update[d])
      else:
        self.classes.fix([operand[d], update[d]], "dynamic_update_slice")
    self.classes.fix([a for axes in ins[2:] for a in axes])
    return [operand]

  def _pooled(self, eqn, ins, out_shapes):
    """Pooling windows: axes the window spans are fixed, the others carried."""
    p = eqn.params
    whole = [w == 1 and st == 1 and pad == (0, 0) for w, st, pad in
             zip(p["window_dimensions"], p["window_strides"], p["padding"])]
    return [self._windowed(ins, out_shapes[0], whole, None)]

  rule_reduce_window_max = rule_reduce_window_min = rule_reduce_window_sum = _pooled

  def rule_rev(self, eqn, ins, out_shapes):
    self.classes.fix([ins[0][d] for d in eqn.params["dimensions"]], "rev")
    return [ins[0]]

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
      return self.opaque(ins, out_shapes, "conv_general_dilated with batch_group_count > 1")
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
  setattr(_Interpreter, f"rule_{_name}", lambda self, eqn, ins, outs: self._reduce(eqn, ins, outs, None))
for _name in CUMULATIVE:
  setattr(_Interpreter, f"rule_{_name}", _Interpreter._cumulative_op)


def _alike_along(value: np.ndarray, axis: int) -> bool:
  """Whether every slice of `value` along `axis` is the same (NaNs compare equal)."""
  first = np.take(value, [0], axis=axis)
  same = value == first
  if np.issubdtype(value.dtype, np.inexact):
    same |= np.isnan(value) & np.isnan(first)
  return bool(same.all())


def _paths(tree_: PyTree) -> list[tuple[str, ...]]:
  return list(tree.leaves_by_path(tree_))


class SpecReport(NamedTuple):
  """A traced spec and what kept variable axes out of it (`spec_report`).

  Attributes:
    spec: the PermutationSpec `permutation_spec` returns.
    fixed_by: construct -> the paths of the variables with an axis (or a
      part or component of one) that the construct alone fixed, e.g.
      `{"scan": (("params", "layers", "kernel"),)}`. Axes fixed by the
      function's structure (arguments, outputs, literals, `iota`, the
      spatial axes of convolutions and windows, the looked-up axis of an
      embedding) are not listed. An indexed reshape not read as a split
      lists its variables under "an index of a reshaped axis not read as
      parts (...)": its part index is fixed and its parts share their inner
      groups (coarser than the split).
    unread: the paths of variables the function never reads; they are in no
      group.
    unknown: primitives the interpreter has no rule for (they fix every axis
      they touch).
    shared: why -> the paths of variables a `scan` iterates over whose
      copies nonetheless share one permutation (ordinary groups instead of
      batched ones): "read outside the loop" (by another equation than the
      scan), "carried out of the loop by ys" (a per-iteration output of the
      class leaves the loop stacked).
  """

  spec: spec_lib.PermutationSpec
  fixed_by: Mapping[str, tuple[tuple[str, ...], ...]]
  unread: tuple[tuple[str, ...], ...]
  unknown: tuple[str, ...]
  shared: Mapping[str, tuple[tuple[str, ...], ...]] = {}

  def message(self) -> str | None:
    """The one warning `permutation_spec` gives for this report, or None."""
    lines = []
    if self.unknown:
      lines.append(f"unknown primitives {list(self.unknown)} fix every axis they touch")
    for why, paths in self.fixed_by.items():
      lines.append(f"{why} fixed axes of {', '.join(tree.path_str(p) for p in paths)}")
    for why, paths in self.shared.items():
      lines.append(f"scan: the copies of {', '.join(tree.path_str(p) for p in paths)} share one permutation"
                   f" ({why})")
    if self.unread:
      lines.append(f"never read, in no group: {', '.join(tree.path_str(p) for p in self.unread)}")
    if not lines:
      return None
    return ("permutation_spec: " + "; ".join(lines)
            + ". Such axes are left out of every group (DESIGN.md, 'Other definitions', Tracer).")


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
    warn: give one UserWarning naming the constructs that fixed variable
      axes (scan, while, sort, argmax, gathers other than embeddings, unknown
      primitives...), with the variables concerned, and the variables never
      read (`spec_report` returns the same as data).

  Returns:
    A PermutationSpec whose groups are the variable axes that can be permuted
    together without changing the function; factored axes carry
    `AxisRef.factor`, parts of an axis used apart (q | k | v) `AxisRef.part`.
  """
  report = spec_report(apply_fn, variables, *example_args)
  message = report.message()
  if warn and message:
    warnings.warn(message, stacklevel=2)
  return report.spec


def spec_report(apply_fn: Callable[..., Any], variables: PyTree, *example_args: Any) -> SpecReport:
  """`permutation_spec`'s spec, with what fixed variable axes and which variables are unread.

  Arguments as for `permutation_spec`; nothing is warned.
  """
  closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(variables, *example_args)
  var_paths = _paths(variables)
  var_shapes = [tuple(x.shape) for x in jax.tree.leaves(variables)]
  arg_shapes = [tuple(x.shape) for x in jax.tree.leaves(example_args)]
  interp = _Interpreter()
  classes = interp.classes
  var_axes = [interp.fresh(s) for s in var_shapes]
  interp.var_axes = var_axes
  arg_axes = [interp.fresh(s, fixed=True) for s in arg_shapes]
  sources = list(range(len(var_paths))) + [None] * len(arg_shapes)
  outs = interp.run(closed.jaxpr, var_axes + arg_axes, sources, closed.consts)

  by_path = dict(zip(var_paths, var_axes))
  for out_path, axes in zip(_paths(out_shape), outs):
    match = next((p for p in var_paths if len(p) <= len(out_path) and out_path[-len(p):] == p), None)
    if match is not None and len(by_path[match]) == len(axes):
      for a, b in zip(by_path[match], axes):
        classes.unify(a, b)
    else:
      classes.fix(axes)
  # Parts a slice left out that nothing selects are fixed: what the traced
  # shapes do not read (position embeddings past the example's length).
  selected = {classes.find(m) for axis in interp.selected for n in axis for m in classes.current(n)}
  classes.fix([[m for n in axis for m in classes.current(n) if classes.find(m) not in selected]
               for axis in interp.dropped])
  read = [i in interp.read for i in range(len(var_paths))]
  described = [[_describe(classes, axis) for axis in axes] if r else [] for axes, r in zip(var_axes, read)]
  batched, shared = interp.batched()
  fixed_by = _fixed_by(classes, var_paths, var_axes, read)
  indexed = {classes.find(n) for n in interp.indexed_outer}
  whole = tuple(p for p, axes, r in zip(var_paths, var_axes, read)
                if r and any(classes.find(m) in indexed for axis in axes for n in axis for m in _below(classes, n)))
  if whole:
    fixed_by = dict(sorted({**fixed_by, _INDEXED_WHOLE: whole}.items()))
  return SpecReport(
      _collect(classes, var_paths, described, batched),
      fixed_by,
      tuple(p for p, r in zip(var_paths, read) if not r),
      tuple(sorted(interp.unknown)),
      {why: tuple(var_paths[v] for v in sorted(shared) if shared[v] == why)
       for why in sorted(set(shared.values()))},
  )


def _below(classes: _Classes, node: int) -> list[int]:
  """`node` and every node a split made of it, through both kinds of split."""
  inner = classes.children.get(node, []) + [c for _, p in classes.parts.get(node, []) for c in p]
  return [node] + [m for c in inner for m in _below(classes, c)]


def _describe(classes: _Classes, axis: Axis) -> list[tuple[int, Any, Any]]:
  """`(node, factor, part)` of every current component of a variable's axis.

  An axis cut in parts has each part viewed by a factor; a part cut inside a
  product component (half of each head's head_dim) has no AxisRef, so its
  class is fixed here.
  """
  top = classes.leaves(axis)
  out = []

  def components(nodes, part):
    sizes = [classes.size[n] for n in nodes]
    for k, node in enumerate(nodes):
      if node in classes.parts:
        classes.fix([[node]], "a slice inside a factored axis")
        continue
      factor = None
      if len(nodes) > 1:
        outer, inner = math.prod(sizes[:k]), math.prod(sizes[k + 1:])
        view = tuple(s for s in (outer, sizes[k], inner) if s != 1)
        factor = (view, 0 if outer == 1 else 1)
      out.append((node, factor, part))

  if len(top) == 1 and top[0] in classes.parts:
    start = 0
    for size, p in classes.flat_parts(top[0]):
      components(classes.leaves(p), (start, start + size))
      start += size
  else:
    components(top, None)
  return out


def _collect(classes: _Classes, paths, described, batched: Mapping[int, int]) -> spec_lib.PermutationSpec:
  """The groups; a batched class's refs have batch axis 0 (the scanned variables' copies)."""
  groups: dict[int, list[spec_lib.AxisRef]] = {}
  names: dict[int, str] = {}
  for path, axes in zip(paths, described):
    for d, comps in enumerate(axes):
      for k, (node, factor, part) in enumerate(comps):
        if classes.is_fixed(node):
          continue
        root = classes.find(node)
        if root not in groups:
          groups[root] = []
          where = "" if part is None else f"@{part[0]}"
          names[root] = f"{tree.path_str(path)}:{d}{where}" + (f"[{k}]" if factor else "")
        groups[root].append(spec_lib.AxisRef(path, d, factor, part, 0 if root in batched else None))
  return spec_lib.PermutationSpec(
      {names[r]: refs for r, refs in groups.items()},
      {names[r]: classes.size[r] for r in groups},
      {names[r]: batched[r] for r in groups if r in batched},
  )


def _fixed_by(classes: _Classes, paths, var_axes, read) -> dict[str, tuple[tuple[str, ...], ...]]:
  """Construct -> variables it alone fixed (classes no structural cause fixed)."""
  causes: dict[int, set[str | None]] = {}
  for why, nodes in classes.events:
    for n in nodes:
      for m in classes.current(n):
        causes.setdefault(classes.find(m), set()).add(why)
  out: dict[str, list[tuple[str, ...]]] = {}
  for path, axes, r in zip(paths, var_axes, read):
    if not r:
      continue
    whys = set()
    for axis in axes:
      for n in axis:
        for m in classes.current(n):
          if classes.is_fixed(m) and None not in causes.get(classes.find(m), {None}):
            whys |= causes[classes.find(m)]
    for why in sorted(whys):
      out.setdefault(why, []).append(path)
  return {why: tuple(ps) for why, ps in sorted(out.items())}


def capture(apply_fn: Callable[..., Any], *, unroll_scans: bool = False
            ) -> Callable[..., tuple[Any, dict[tuple[str, ...], Any]]]:
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
    unroll_scans: run every `scan` that iterates over a variable as a
      Python loop, so copy l of a stacked kernel (the variable indexed l on
      axis 0) is a kernel of its own, keyed `path + (str(l),)` (the paths of
      `mergejax.stacked.unstack`); a variable that is a const of the scan
      keeps its path, one use per iteration. Off: a scan is one operation
      and its kernels are not seen.

  Returns:
    `(variables, *args) -> (apply_fn(variables, *args), feats)`, feats keyed by
    the kernel's path (a tuple of key names, as in AxisRef.path).
  """

  def captured(variables: PyTree, *args: Any):
    out, uses = kernel_uses(apply_fn, unroll_scans=unroll_scans)(variables, *args)
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


def kernel_uses(apply_fn: Callable[..., Any], *, unroll_scans: bool = False
                ) -> Callable[..., tuple[Any, dict[tuple[str, ...], list[KernelUse]]]]:
  """Like `capture`, with every use of a kernel and the axes it contracted.

  Returns:
    `(variables, *args) -> (out, uses)`, `uses[path]` a list of KernelUse in
    call order; the axis pairs are static Python ints.
  """

  def run(variables: PyTree, *args: Any):
    out, record = _run(apply_fn, variables, args, {}, unroll_scans)
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
    self.unroll_scans = False  # run scans over variables as Python loops (`capture`)


def _run(apply_fn, variables: PyTree, args: tuple, probes, unroll_scans: bool = False) -> tuple[Any, _Record]:
  closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(variables, *args)
  provenance = _paths(variables) + [None] * len(jax.tree.leaves(args))
  record = _Record(probes)
  record.unroll_scans = unroll_scans
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
    if name == "scan" and record.unroll_scans and any(sources[eqn.params["num_consts"] + eqn.params["num_carry"]:]):
      env.update(zip(eqn.outvars, _unrolled_scan(eqn.params, values, sources, record)))
      continue
    with eqn.ctx.manager:
      outs = _bind(eqn, values)
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


def _bind(eqn, values: list) -> Any:
  """The equation's result: a convolution XLA:CPU would run on its slow path as a tap sum
  (`tap_convolution`), any other equation bound as it is."""
  if (eqn.primitive.name == "conv_general_dilated" and jax.default_backend() == "cpu"
      and tap_convolution.is_slow_on_cpu(*(v.shape for v in values), **eqn.params)):
    return tap_convolution.tap_sum(*values, **eqn.params)
  return eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))


def evaluate(fn: Callable[..., Any], variables: PyTree, *args: Any) -> Any:
  """`fn(variables, *args)`, evaluated equation by equation as mergejax's passes over data run it.

  The same values as `fn`'s (up to float rounding), with the convolutions
  XLA:CPU runs slowly computed as tap sums (`tap_convolution`); calls that
  read the variables are evaluated inside. Under `jax.jit` this costs nothing
  at run time. `mj.repair.reset_batch_norm` runs the model this way, as the
  Gram pass (`kernel_uses`) does.
  """
  return _run(fn, variables, args, {})[0]


def _unrolled_scan(params, values, sources, record: _Record) -> list:
  """A scan as a Python loop: iteration l reads copy l of each xs variable as `path + (str(l),)`."""
  nc, nk, length = params["num_consts"], params["num_carry"], params["length"]
  body = params["jaxpr"]
  consts, carry, xs = values[:nc], list(values[nc:nc + nk]), values[nc + nk:]
  steps = range(length - 1, -1, -1) if params["reverse"] else range(length)
  ys = {}
  for i in steps:
    provenance = (list(sources[:nc]) + [None] * nk
                  + [None if s is None else s + (str(i),) for s in sources[nc + nk:]])
    outs = _evaluate(body.jaxpr, body.consts, list(consts) + carry + [x[i] for x in xs], provenance, record)
    carry, ys[i] = list(outs[:nk]), outs[nk:]
  stacked = [jnp.stack([ys[i][k] for i in range(length)]) for k in range(len(body.jaxpr.outvars) - nk)]
  return carry + stacked


def read_order(apply_fn: Callable[..., Any], variables: PyTree, *example_args: Any) -> list[tuple[str, ...]]:
  """The variables' paths in the order `apply_fn(variables, *example_args)` first reads them.

  A read is an equation of the traced jaxpr that takes the variable as an
  operand; calls (`pjit`, `remat2`, custom derivatives...) are followed
  inside, so a jitted `apply_fn` reads its variables where its layers do.
  `scan`, `cond` and `while` read all their operands at once. Variables the
  function never reads are left out.

  Args:
    apply_fn: as for `permutation_spec`.
    variables: the whole variables tree (arrays or `jax.ShapeDtypeStruct`s).
    *example_args: example inputs; only their shapes matter.

  Returns:
    The paths (tuples of key names, as in AxisRef.path), first read first.
  """
  closed = jax.make_jaxpr(apply_fn)(variables, *example_args)
  sources = _paths(variables) + [None] * len(jax.tree.leaves(example_args))
  order: dict[tuple[str, ...], None] = {}
  _first_reads(closed.jaxpr, sources, order)
  return list(order)


def _first_reads(jaxpr, sources: Sequence[tuple[str, ...] | None], order: dict) -> None:
  """Adds to `order`, in equation order, the variables each equation reads."""
  origin = {v: s for v, s in zip(jaxpr.invars, sources) if s}
  for eqn in jaxpr.eqns:
    read = [None if isinstance(v, jex_core.Literal) else origin.get(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in CALLS and CALLS[name] in eqn.params:
      inner = eqn.params[CALLS[name]]
      inner_jaxpr = getattr(inner, "jaxpr", inner)
      n = len(inner_jaxpr.invars)
      for path in read[:len(read) - n]:
        if path:
          order.setdefault(path)
      _first_reads(inner_jaxpr, read[len(read) - n:], order)
      continue
    for path in read:
      if path:
        order.setdefault(path)
