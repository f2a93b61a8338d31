"""A model's kernels as the merges see them: matrix plans, costs, and data.

    kernels = model_kernels(apply_fn, variables, example)   # one abstract trace
    terms = cost_terms(spec, kernels, variables, {}, fixed, "flops")
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import fractions
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from mergejax import align
from mergejax import spec as spec_lib
from mergejax import stacked
from mergejax import trace
from mergejax import tree
from mergejax.merge import budget as budget_lib
from mergejax.merge import combine
from mergejax.merge import least_squares

Path = tuple[str, ...]
peek = align.peek  # the first batch's input, and batches from the start again


class Kernel(NamedTuple):
  """A kernel: its path, matrix plan, shape, and work per example.

  Attributes:
    macs: multiply-adds per example, as XLA's cost analysis counts them: a
      convolution's (output position, tap) pairs whose tap falls inside its
      input (`in_image_fraction`), padded taps not counted.
    positions: output rows per example (the design matrix's rows: output
      positions summed over the kernel's uses).
  """

  path: Path
  plan: least_squares.KernelPlan
  shape: tuple[int, ...]
  macs: float
  positions: float


def replayable(batches) -> Callable[[], Iterable[Any]]:
  """A callable giving fresh iterators (a one-shot iterator is kept in memory)."""
  if callable(batches):
    return batches
  if iter(batches) is batches:
    kept = list(batches)
    return lambda: kept
  return lambda: batches


def model_kernels(apply_fn, variables, example, *, unroll_scans: bool = False) -> list[Kernel]:
  """Every kernel's matrix plan and MACs per example, from one abstract trace.

  With `unroll_scans`, copy l of a kernel stacked under a `scan` is a kernel
  of its own, at `path + (str(l),)` with the copy's shape (`trace.capture`).
  """
  found = align.traced_kernel_uses(apply_fn, variables, example, unroll_scans)
  leaves = tree.leaves_by_path(variables)
  out = []
  for path, uses in found.items():
    shape = tuple(np.shape(leaves[path]) if path in leaves else np.shape(leaves[path[:-1]])[1:])
    plans = {least_squares.kernel_plan(u, shape, "/".join(path)) for u in uses}
    if len(plans) != 1:
      raise ValueError(f"{'/'.join(path)}: the kernel is used with different axes; no single least-squares"
                       " problem fits it")
    plan = plans.pop()
    contracted = int(np.prod([shape[a] for a in plan.in_axes], dtype=np.int64))
    outputs = int(np.prod([shape[a] for a in plan.out_axes], dtype=np.int64))
    per_example = [int(np.prod(u.output.shape[1:], dtype=np.int64)) for u in uses]
    macs = sum(n * contracted * in_image_fraction(u, shape) for n, u in zip(per_example, uses))
    out.append(Kernel(path, plan, shape, float(macs), sum(per_example) / outputs))
  return out


def in_image_fraction(use: trace.KernelUse, kernel_shape: Sequence[int]) -> fractions.Fraction:
  """The share of a use's (output position, tap) pairs whose tap reads inside the input.

  1 for a dot_general. For a convolution, per spatial axis, output position
  o and tap j read input index `o * stride - padding_low + j * rhs_dilation`,
  a real input unit when it is a multiple of `lhs_dilation` whose quotient
  lies in `[0, input size)` (XLA's `HloCostAnalysis` counts these pairs only);
  the share is the product over the spatial axes. A 3x3 convolution with
  padding 1 on a 4x4 map reads 10 of 12 (position, tap) pairs per axis:
  (10/12)^2.
  """
  if use.primitive != "conv_general_dilated":
    return fractions.Fraction(1)
  p = use.params
  dn = p["dimension_numbers"]
  inside, pairs = 1, 1
  for i, (lhs, rhs, out) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:])):
    size, taps, positions = use.input.shape[lhs], kernel_shape[rhs], use.output.shape[out]
    base = p["lhs_dilation"][i] if p["lhs_dilation"] else 1
    window = p["rhs_dilation"][i] if p["rhs_dilation"] else 1
    index = (np.arange(positions)[:, None] * p["window_strides"][i] - p["padding"][i][0]
             + np.arange(taps)[None, :] * window)
    inside *= int(np.sum((index % base == 0) & (index // base >= 0) & (index // base < size)))
    pairs *= positions * taps
  return fractions.Fraction(inside, pairs)


def cost_terms(spec, kernels, variables, heads_models, fixed, cost) -> list[budget_lib.CostTerm]:
  """The budget's cost terms: one per kernel (FLOPs) or per leaf (parameters), and per piece
  of a leaf whose fused axis is cut into parts (GPT-2's q | k | v: each part's share of the
  cost, with its own groups, as `combine.leaf_pieces` lays it out)."""
  by_leaf = combine.refs_by_leaf(spec)
  if cost == "flops":
    items = [(k.path, k.shape, k.macs) for k in kernels]
  else:
    items = [(p, np.shape(x), float(np.size(x))) for p, x in tree.leaves_by_path(variables).items()]
  terms = []
  for path, shape, c in items:
    for piece in combine.leaf_pieces(shape, by_leaf.get(path, []), tree.path_str(path)):
      share = 1.0 if piece.axis is None else (piece.stop - piece.start) / shape[piece.axis]
      groups = () if path in heads_models else tuple(sorted(g for _, g in piece.view.groups if g not in fixed))
      if c * share > 0:
        terms.append(budget_lib.CostTerm(c * share, groups))
  return terms


def design_row_fn(apply_fn, kernels: Sequence[Kernel], *, unroll_scans: bool = False):
  """(variables, x) -> [f32[batch, positions, d_in], ...]: each kernel's design rows.

  A kernel used several times has its uses' rows side by side (axis 1).
  `unroll_scans` as for `model_kernels` (kernels of stacked copies).
  """

  def features(variables, x):
    _, uses = trace.kernel_uses(apply_fn, unroll_scans=unroll_scans)(variables, x)
    return [jnp.concatenate([least_squares.design_rows(u, k.shape) for u in uses[k.path]], axis=1)
            for k in kernels]

  return features


def gram_bytes(kernels: Sequence[Kernel], models: int = 2) -> int:
  """Bytes of the float32 Gram matrices of `[X_1 | ... | X_models]` for `kernels`."""
  return sum(4 * (models * int(np.prod([k.shape[a] for a in k.plan.in_axes], dtype=np.int64))) ** 2 for k in kernels)


def head_models(heads: Mapping[str, Any] | None, variables) -> dict[Path, tuple[int, ...]]:
  """Leaf path -> (0,) or (1,) for the leaves of each model's own head.

  Args:
    heads: `{"a": path, "b": path}` (a "/"-joined string or a tuple of keys),
      or None (the models share their outputs).
    variables: either model's variables.
  """
  if heads is None:
    return {}
  if sorted(heads) != ["a", "b"]:
    raise ValueError(f"heads must name 'a' and 'b', got {sorted(heads)}")
  out = {}
  for model, name in enumerate(("a", "b")):
    prefix = tuple(heads[name].split("/")) if isinstance(heads[name], str) else tuple(heads[name])
    matched = [p for p in tree.leaves_by_path(variables) if p[:len(prefix)] == prefix]
    if not matched:
      raise ValueError(f"heads[{name!r}] = {'/'.join(prefix)} names no variables")
    out.update({p: (model,) for p in matched})
  return out


class Unrolled(NamedTuple):
  """A model as PLeaS and ZipIt! read it: its spec with batched groups unrolled (`mergejax.stacked`).

  For a spec without batched groups every field is the identity. With them,
  the flat spec has a group per copy, every stacked leaf a `scan` reads as
  a kernel is cut into its copies (their paths `trace.capture(...,
  unroll_scans=True)`'s), and each copy is a kernel of its own.

  Attributes:
    spec: the flat spec.
    owner: flat group -> the given spec's group (`"g[l]"` -> g).
    kernels: every kernel (copies apart), `model_kernels`.
    cut: `{stacked leaf: batch axis}` given to `unstack` (None: nothing cut).
    batched: the given spec.
  """

  spec: spec_lib.PermutationSpec
  owner: dict[str, str]
  kernels: list[Kernel]
  cut: dict[Path, int] | None
  batched: spec_lib.PermutationSpec

  @classmethod
  def of(cls, spec, apply_fn, variables, example) -> "Unrolled":
    unroll = bool(spec.batch_sizes)
    kernels = model_kernels(apply_fn, variables, example, unroll_scans=unroll)
    if not unroll:
      return cls(spec, {g: g for g in spec.groups}, kernels, None, spec)
    cut = stacked.scanned_copies(variables, [k.path for k in kernels])
    flat_spec, _ = stacked.unstack(spec, variables, stacked=cut)
    return cls(flat_spec, stacked.copy_owners(spec), kernels, cut, spec)

  @property
  def unroll(self) -> bool:
    return self.cut is not None

  def unstack(self, variables):
    """The model's variables -> the flat spec's."""
    return variables if not self.unroll else stacked.unstack(self.batched, variables, stacked=self.cut)[1]

  def stack(self, flat_variables):
    """The flat spec's variables -> the model's."""
    return flat_variables if not self.unroll else stacked.stack(self.batched, flat_variables, stacked=self.cut)

  @property
  def in_axes(self) -> dict[Path, frozenset[int]]:
    """kernel path -> its input axes (`combine.combine`'s `inputs`)."""
    return {k.path: frozenset(k.plan.in_axes) for k in self.kernels}

  def cost_terms(self, flat_variables, heads_models, cost) -> tuple[frozenset[str], list[budget_lib.CostTerm]]:
    """(the given spec's groups never widened, the budget's cost terms over the given spec's groups):
    `cost_terms` of the flat spec, a copy's groups named by their owner, so a batched group's ratio is
    tied across its copies."""
    fixed = frozenset(self.owner[g] for g in combine.fixed_groups(self.spec, self.in_axes))
    flat_fixed = frozenset(g for g in self.spec.groups if self.owner[g] in fixed)
    terms = [t._replace(groups=tuple(self.owner[g] for g in t.groups))
             for t in cost_terms(self.spec, self.kernels, flat_variables, heads_models, flat_fixed, cost)]
    return fixed, terms
