"""A model's kernels as the merges see them: matrix plans, costs, and data.

    kernels = model_kernels(apply_fn, variables, example)   # one abstract trace
    terms = cost_terms(spec, kernels, variables, {}, fixed, "flops")
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import align
from mergejax import trace
from mergejax import tree
from mergejax.merge import budget as budget_lib
from mergejax.merge import combine
from mergejax.merge import least_squares

Path = tuple[str, ...]
peek = align.peek  # the first batch's input, and batches from the start again


class Kernel(NamedTuple):
  """A kernel: its path, matrix plan, shape, and multiply-adds per example."""

  path: Path
  plan: least_squares.KernelPlan
  shape: tuple[int, ...]
  macs: float


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
  found = {}

  def probe(v, x):
    _, uses = trace.kernel_uses(apply_fn, unroll_scans=unroll_scans)(v, x)
    found.update(uses)
    return 0

  jax.eval_shape(probe, variables, example)
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
    macs = sum(np.prod(u.output.shape, dtype=np.float64) / u.output.shape[0] * contracted for u in uses)
    out.append(Kernel(path, plan, shape, float(macs)))
  return out


def cost_terms(spec, kernels, variables, heads_models, fixed, cost) -> list[budget_lib.CostTerm]:
  """The budget's cost terms: one per kernel (FLOPs) or per leaf (parameters)."""
  by_leaf = combine.refs_by_leaf(spec)
  widened = lambda path: tuple(sorted(g for g, _ in by_leaf.get(path, []) if g not in fixed))
  if cost == "flops":
    items = [(k.path, k.macs) for k in kernels]
  else:
    items = [(p, float(np.size(x))) for p, x in tree.leaves_by_path(variables).items()]
  return [budget_lib.CostTerm(c, () if p in heads_models else widened(p)) for p, c in items if c > 0]


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
