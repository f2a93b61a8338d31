"""ZipIt! (Stoica et al. 2023): zip features within and across two models.

    merged, layout, cost = mj.merge.zipit(model.apply, va, vb, batches, budget=1.5)

Each group's features are correlated within and across both models (one
sharded pass, `mergejax.stats.cross_moments`), and `zip_match` greedily
merges the most correlated features, from either model, into one unit
(alpha, beta as in the reference). Partial zipping zips the first groups in
forward order and keeps the rest of both models side by side: budgets are
discrete, so the achieved budget (the least cost at or below the one asked,
`budget.stage_cut`) is returned beside the merge. No least squares, and no
permutation first: merge and unmerge do the aligning. A batched spec (layers
under `scan`) is zipped copy by copy, its zip-or-keep choice tied across the
copies (DESIGN.md, Stacked <-> unrolled).
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from mergejax import align
from mergejax import distributed
from mergejax import repair
from mergejax import spec as spec_lib
from mergejax import stacked
from mergejax import stats
from mergejax import trace
from mergejax import tree
from mergejax.merge import budget as budget_lib
from mergejax.merge import combine
from mergejax.merge import compact as compact_lib
from mergejax.merge import kernels as kernels_lib
from mergejax.merge import zip_match

PyTree = Any


def correlations(spec, apply_fn, va, vb, batches, *, mesh=None, progress=True) -> dict[str, np.ndarray]:
  """group -> f64[2n, 2n], the correlation of both models' features concatenated
  (A's first), averaged over the group's features (as activation matching reads them).

  A batched group's is f64[L, 2n, 2n], copy l's features (the scans unrolled, as
  activation matching reads a batched spec): the unrolled model's groups, stacked.
  """
  example, batches = distributed.peek_any_process(mesh, kernels_lib.peek, batches, "zipit")
  unroll = bool(spec.batch_sizes)
  uses = align.traced_kernel_uses(apply_fn, va, example, unroll)
  unrolled = align.flat_spec(spec, va, uses) if unroll else spec
  plan = align.feature_plan(unrolled, uses)

  def features(variables, x):
    _, found = trace.kernel_uses(apply_fn, unroll_scans=unroll)(variables, x)
    return [align.feature_rows(found[f.path][f.use].output if f.is_output else found[f.path][f.use].input, f)
            for f in plan]

  moments = stats.accumulate(stats.cross_moments(features), (va, vb), batches, mesh=mesh, progress=progress)
  out = {g: 0.0 for g in unrolled.groups}
  for f, m in zip(plan, moments):
    cov = np.block([[np.asarray(m.cov_aa), np.asarray(m.cov_ab)], [np.asarray(m.cov_ab).T, np.asarray(m.cov_bb)]])
    std = np.sqrt(np.diag(cov) + 1e-12)
    out[f.group] = out[f.group] + cov / np.outer(std, std) / sum(e.group == f.group for e in plan)
  # A group no feature reads (one unit no leaf names): its two units alike.
  out = {g: np.asarray(c, np.float64) if np.ndim(c) else np.ones((2 * unrolled.sizes[g],) * 2)
         for g, c in out.items()}
  if not unroll:
    return out
  return {g: out[g] if g not in spec.batch_sizes else
          np.stack([out[stacked.copy_name(g, i)] for i in range(spec.batch_sizes[g])]) for g in spec.groups}


def _unit_map(m: zip_match.ZipMatch) -> combine.UnitMap:
  return combine.UnitMap(m.merge_index, m.merge_weight, m.unmerge)


def _group_map(corr: np.ndarray, n: int, how: str, alpha: float, beta: float) -> combine.UnitMap:
  """One group's (or copy's) UnitMap from its f64[2n, 2n] correlations: "zip" to n units, "fixed" to n
  without merges within a model (never widened), or "keep" both models' units."""
  if how == "keep":
    return combine.partial_map(np.zeros(n, bool))
  if how == "fixed":
    alpha, beta = 0.0, 0.0
  return _unit_map(zip_match.zip_match(corr, n, alpha=alpha, beta=beta))


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
    compact: bool = False,
) -> tuple[PyTree, spec_lib.MergeLayout, budget_lib.Allocation]:
  """Zips two models; the first groups fully, the rest kept, within `budget`.

  Args:
    apply_fn, va, vb, batches, spec, heads, build_fn, mesh, progress, compact: as for
      `mergejax.merge.pleas` (with `heads`, each model keeps its own head,
      which reads the zipped and its own kept features).
    budget: in [1, 2]; the zipped prefix is the shortest whose cost meets it.
    alpha, beta: ZipIt!'s (`zip_match`).

  A batched group (stacked copies, e.g. layers under `scan`) is zipped in
  every copy or kept in every copy: the stage cut runs over the spec's groups,
  a batched group's cost the sum over its copies (as PLeaS ties its ratio).
  Each copy zips its own features (`correlations`, the scans unrolled), so the
  copies keep one width, n or 2n, and the result is ZipIt! on the unrolled
  model stacked back, wherever the unrolled cut falls between layers alike
  (budgets 1 and 2, or a cut before the first scanned group).

  Returns:
    `(merged variables, layout, allocation)`: the allocation's `cost` is the
    budget achieved, its ratios 1 (zipped) or 0 (kept) per group.
  """
  tree.check_same_structure(va, vb)
  tree.check_same_shapes(va, vb)
  example, batches = distributed.peek_any_process(mesh, kernels_lib.peek, batches, "zipit")
  batches = kernels_lib.replayable(batches)
  spec = spec if spec is not None else trace.permutation_spec(apply_fn, va, example)
  spec_lib.check_spec(spec, va)
  if compact:
    stacked.check_unbatched(spec, "zipit(compact=True)")
  view = kernels_lib.Unrolled.of(spec, apply_fn, va, example)
  fa, fb = view.unstack(va), view.unstack(vb)
  heads_models = kernels_lib.head_models(heads, fa)
  inputs = view.in_axes
  fixed, terms = view.cost_terms(fa, heads_models, "flops")
  order = [g for g in spec.groups if g not in fixed]
  alloc = budget_lib.stage_cut(terms, order, budget)
  corr = correlations(spec, apply_fn, va, vb, batches, mesh=mesh, progress=progress)
  maps = {}
  for g, n in spec.sizes.items():
    how = "fixed" if g in fixed else "zip" if alloc.ratios[g] == 1.0 else "keep"
    args = (n, how, alpha, beta)
    maps[g] = [_group_map(c, *args) for c in corr[g]] if g in spec.batch_sizes else _group_map(corr[g], *args)
  layout = combine.layout_of(maps)
  merged = view.stack(combine.combine(view.spec, stacked.unstack_per_copy(spec, maps, "zipit"), fa, fb,
                                     inputs=inputs, models=heads_models))
  if build_fn is not None:
    merged = repair.reset_batch_norm(build_fn(layout), merged, batches())
  if compact:
    merged = compact_lib.compact_variables(spec, layout, merged, inputs=inputs, models=heads_models)
  return merged, layout, alloc
