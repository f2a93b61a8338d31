"""ZipIt! (Stoica et al. 2023): zip features within and across two models.

    merged, layout, cost = mj.merge.zipit(model.apply, va, vb, batches, budget=1.5)

Each group's features are correlated within and across both models (one
sharded pass, `mergejax.stats.cross_moments`), and `zip_match` greedily
merges the most correlated features, from either model, into one unit
(alpha, beta as in the reference). Partial zipping zips the first groups in
forward order and keeps the rest of both models side by side: budgets are
discrete, so the achieved budget (the least cost at or below the one asked,
`budget.stage_cut`) is returned beside the merge. No least squares, and no
permutation first: merge and unmerge do the aligning.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from mergejax import align
from mergejax import repair
from mergejax import spec as spec_lib
from mergejax import stacked
from mergejax import stats
from mergejax import trace
from mergejax import tree
from mergejax.merge import budget as budget_lib
from mergejax.merge import combine
from mergejax.merge import kernels as kernels_lib
from mergejax.merge import zip_match

PyTree = Any


def correlations(spec, apply_fn, va, vb, batches, *, mesh=None, progress=True) -> dict[str, np.ndarray]:
  """group -> f64[2n, 2n], the correlation of both models' features concatenated
  (A's first), averaged over the group's features (as activation matching reads them)."""
  example, batches = kernels_lib.peek(batches)
  plan = align._plan_for(spec, apply_fn, va, example)

  def features(variables, x):
    _, found = trace.kernel_uses(apply_fn)(variables, x)
    return [align._feature_rows(found[f.path][f.use].output if f.is_output else found[f.path][f.use].input, f)
            for f in plan]

  moments = stats.accumulate(stats.cross_moments(features), (va, vb), batches, mesh=mesh, progress=progress)
  out = {g: 0.0 for g in spec.groups}
  for f, m in zip(plan, moments):
    cov = np.block([[np.asarray(m.cov_aa), np.asarray(m.cov_ab)], [np.asarray(m.cov_ab).T, np.asarray(m.cov_bb)]])
    std = np.sqrt(np.diag(cov) + 1e-12)
    out[f.group] = out[f.group] + cov / np.outer(std, std) / sum(e.group == f.group for e in plan)
  # A group no feature reads (one unit no leaf names): its two units alike.
  return {g: np.asarray(c, np.float64) if np.ndim(c) else np.ones((2 * spec.sizes[g],) * 2)
          for g, c in out.items()}


def _unit_map(m: zip_match.ZipMatch) -> combine.UnitMap:
  return combine.UnitMap(m.merge_index, m.merge_weight, m.unmerge)


def zipit(
    apply_fn: Callable[..., Any],
    va: PyTree,
    vb: PyTree,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    budget: float = 1.0,
    alpha: float = 0.3,
    beta: float = 0.125,
    spec: spec_lib.PermutationSpec | None = None,
    heads: Mapping[str, Any] | None = None,
    build_fn: Callable[[spec_lib.MergeLayout], Callable[..., Any]] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> tuple[PyTree, spec_lib.MergeLayout, budget_lib.Allocation]:
  """Zips two models; the first groups fully, the rest kept, within `budget`.

  Args:
    apply_fn, va, vb, batches, spec, heads, build_fn, mesh, progress: as for
      `mergejax.merge.pleas` (with `heads`, each model keeps its own head,
      which reads the zipped and its own kept features).
    budget: in [1, 2]; the zipped prefix is the shortest whose cost meets it.
    alpha, beta: ZipIt!'s (`zip_match`).

  Returns:
    `(merged variables, layout, allocation)`: the allocation's `cost` is the
    budget achieved, its ratios 1 (zipped) or 0 (kept) per group.
  """
  tree.check_same_structure(va, vb)
  tree.check_same_shapes(va, vb)
  example, batches = kernels_lib.peek(batches)
  batches = kernels_lib.replayable(batches)
  spec = spec if spec is not None else trace.permutation_spec(apply_fn, va, example)
  spec_lib.check_spec(spec, va)
  stacked.check_unbatched(spec, "zipit")
  heads_models = kernels_lib.head_models(heads, va)
  kernels = kernels_lib.model_kernels(apply_fn, va, example)
  inputs = {k.path: frozenset(k.plan.in_axes) for k in kernels}
  fixed = combine.fixed_groups(spec, inputs)
  terms = kernels_lib.cost_terms(spec, kernels, va, heads_models, fixed, "flops")
  order = [g for g in spec.groups if g not in fixed]
  alloc = budget_lib.stage_cut(terms, order, budget)
  corr = correlations(spec, apply_fn, va, vb, batches, mesh=mesh, progress=progress)
  maps = {}
  for g, n in spec.sizes.items():
    if g in fixed:  # never widened, never merged within a model
      maps[g] = _unit_map(zip_match.zip_match(corr[g], n, alpha=0.0, beta=0.0))
    elif alloc.ratios[g] == 1.0:
      maps[g] = _unit_map(zip_match.zip_match(corr[g], n, alpha=alpha, beta=beta))
    else:
      maps[g] = combine.partial_map(np.zeros(n, bool))
  layout = combine.layout_of(maps)
  merged = combine.combine(spec, maps, va, vb, inputs=inputs, models=heads_models)
  if build_fn is not None:
    merged = repair.reset_batch_norm(build_fn(layout), merged, batches())
  return merged, layout, alloc
