"""PLeaS: merging two models with permutations and least squares.

Ainsworth-style alignment, partial merging under an exact compute budget,
and a closed-form least-squares fit of every layer (Nasery et al., "PLeaS:
Merging Models with Permutations and Least Squares", arXiv 2407.02447;
DESIGN.md, How PLeaS works here).

    merged, layout = mj.merge.pleas(model.apply, va, vb, batches, budget=1.5)
    merged_model = mj.models.build("resnet20", layout)     # zoo models

`budget` is the merged model's cost relative to one original: 1.0 merges every
unit (one model's size), 2.0 keeps both models whole (their ensemble in one
network). Costs count FLOPs per example over the structurally non-zero blocks
(an output kept from A reads nothing kept only from B); Dense and convolution
kernels store those blocks as zeros, so the parameter count of the stored
arrays is larger than the count the budget meets.

PLeaS-free is the same call with `batches` from another domain than the
models' own tasks: matching and least squares then never see the tasks' data.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
import functools
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mergejax import align
from mergejax import distributed
from mergejax import permute
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
from mergejax.merge import least_squares

PyTree = Any
Path = tuple[str, ...]
DEFAULT_GRID = tuple(np.linspace(0.0, 1.0, 11))
MATCHINGS = ("weight", "activation", "identity")  # pleas(matching=...)


class Report(NamedTuple):
  """What a PLeaS merge did.

  Attributes:
    allocation: the chosen merge ratios, cost and lost objective.
    layers: one `least_squares.LayerReport` per kernel.
    seconds: wall time of each stage (trace, match, allocation, statistics,
      solves, repair).
  """

  allocation: budget_lib.Allocation
  layers: list[least_squares.LayerReport]
  seconds: dict[str, float]


def _similarity(spec, result, va, vb_aligned, matching) -> dict[str, np.ndarray]:
  """Each matched pair's similarity in [-1, 1]: weight cosine or feature correlation (on the host: one pass over
  the weights, no program per leaf shape)."""
  if matching == "activation":
    return {g: np.asarray(s, np.float64) for g, s in result.pair_scores.items()}
  la, lb = tree.leaves_by_path(va), tree.leaves_by_path(vb_aligned)
  out = {}
  for g, refs in spec.groups.items():
    if not refs:  # a group of one unit no leaf names: nothing to compare, nothing to widen
      out[g] = np.ones(spec.sizes[g], np.float64)
      continue
    a = np.concatenate([align.unit_rows(np.asarray(la[r.path], np.float32), r) for r in refs], 1)
    b = np.concatenate([align.unit_rows(np.asarray(lb[r.path], np.float32), r) for r in refs], 1)
    cos = np.einsum("ij,ij->i", a, b) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    out[g] = cos.astype(np.float64)
  return out


def _options(spec, fixed, grid) -> tuple[dict, dict]:
  """Per group: the merge ratios the grid reaches (whole units), and their merged counts."""
  options, counts = {}, {}
  for g, n in spec.sizes.items():
    if g in fixed:
      continue
    counts[g] = [spec_lib.round_half_up(r * n) for r in grid]
    options[g] = [m / n for m in counts[g]]
  return options, counts


def _losses(similarity, counts) -> dict[str, list[float]]:
  """The matching objective lost by merging the m most similar pairs: sum of (1 - sim)."""
  out = {}
  for g, ms in counts.items():
    rows = np.atleast_2d(similarity[g])  # a batched group's copies: the sum of their losses
    lost = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(1.0 - -np.sort(-rows, axis=1), axis=1)], axis=1)
    out[g] = [float(lost[:, m].sum()) for m in ms]
  return out


def allocate(
    spec: spec_lib.PermutationSpec,
    terms: Sequence[budget_lib.CostTerm],
    similarity: Mapping[str, np.ndarray],
    budget: float,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    method: str = "exact",
    fixed: frozenset[str] = frozenset(),
) -> tuple[budget_lib.Allocation, dict[str, np.ndarray]]:
  """Merge ratios per group, and which pairs each group merges.

  Args:
    spec: the groups.
    terms: the cost terms (`fixed` groups already left out: their ratio is 1).
    similarity: group -> f64[n], each aligned pair's similarity; f64[L, n]
      for a batched group of L copies, whose ratio is tied across them (its
      lost objective is the sum over the copies, each copy merges its own
      most similar pairs).
    budget: in [1, 2].
    grid: the merge ratios each group may take (rounded to whole units).
    method: "exact" (least lost objective, `budget.allocate`), "uniform" (one
      ratio for all), or "stage_cut" (merge the first groups fully, keep the
      rest; the ZipIt!-style cut of the PLeaS paper).
    fixed: groups merged fully whatever the budget.

  Returns:
    The Allocation and group -> bool[n] (bool[L, n] for a batched group), the
    pairs to merge (the most similar).
  """
  options, counts = _options(spec, fixed, grid)
  losses = _losses(similarity, counts)
  if method == "exact":
    alloc = budget_lib.allocate(terms, options, losses, budget)
  elif method == "uniform":
    alloc = budget_lib.uniform(terms, options, budget, losses=losses)
  elif method == "stage_cut":
    alloc = budget_lib.stage_cut(terms, list(options), budget)
  else:
    raise ValueError(f"allocation must be 'exact', 'uniform' or 'stage_cut', got {method!r}")
  merged = {}
  for g, n in spec.sizes.items():
    m = n if g in fixed else spec_lib.round_half_up(alloc.ratios[g] * n)
    rows = np.atleast_2d(similarity[g])
    chosen = np.zeros(rows.shape, bool)
    for row, sim in zip(chosen, rows):
      row[np.argsort(-sim, kind="stable")[:m]] = True
    merged[g] = chosen if np.ndim(similarity[g]) == 2 else chosen[0]
  return alloc, merged


def pleas(
    apply_fn: Callable[..., Any],
    va: PyTree,
    vb: PyTree,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    budget: float,
    matching: str = "weight",
    spec: spec_lib.PermutationSpec | None = None,
    heads: Mapping[str, Any] | None = None,
    build_fn: Callable[[spec_lib.MergeLayout], Callable[..., Any]] | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    allocation: str = "exact",
    cost: str = "flops",
    ridge: float = 1e-3,
    least_squares_fit: bool = True,
    inputs: str = "original",
    merged_apply_fn: Callable[[spec_lib.MergeLayout], Callable[..., Any]] | None = None,
    key: jax.Array | None = None,
    chunk: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    report: bool = False,
    compact: bool = False,
) -> tuple[PyTree, spec_lib.MergeLayout] | tuple[PyTree, spec_lib.MergeLayout, Report]:
  """Merges two models of one architecture into one of `budget` times the cost.

  Args:
    apply_fn: `apply_fn(variables, x)`, e.g. `functools.partial(model.apply,
      train=False)`.
    va, vb: the two models' variables (same structure and shapes).
    batches: inputs (DESIGN.md, batches), read for activation matching, the
      least-squares statistics and the batch-norm reset; data of another
      domain makes this PLeaS-free.
    budget: the merged model's cost relative to one original, in [1, 2].
    matching: "weight" or "activation" (Git Re-Basin), or "identity" (no
      permutation: B's units stay where they are; with
      `least_squares_fit=False` at budget 1.0, the plain average of the
      weights). `mj.merge.select_matching` chooses among them on held-out data.
    spec: the permutation groups (default: traced from `apply_fn`); a zoo
      model's hand spec (`mj.models.permutation_spec`) names the groups as
      `mj.models.build` expects them. A batched group (stacked copies, e.g.
      layers under `scan`) gets one merge ratio for all its copies (its cost
      the sum over them), each copy merging its own most similar pairs and
      solved by its own least squares (DESIGN.md, Stacked <-> unrolled).
    heads: `{"a": path, "b": path}`: each model keeps its own task head
      (the leaves under `path`), solved from the merged and its own kept
      features; otherwise the models share their outputs, which are averaged.
    build_fn: `layout -> train_apply`, `train_apply(variables, x) -> (out,
      {"batch_stats": ...})` of the merged architecture; BatchNorm
      statistics are then reset on `batches`. Without it a model with
      `batch_stats` keeps the combined statistics (a warning says so).
    grid: the merge ratios a group may take.
    allocation: "exact", "uniform" or "stage_cut" (see `allocate`).
    cost: "flops" (per example) or "params".
    ridge: the least squares' relative ridge towards the combined weights.
    least_squares_fit: False stops after combining (permute-and-average with
      partial matching: the paper's baseline).
    inputs: the least squares' inputs: "original" (the originals' inputs,
      merged like the units: one pass for every layer) or "merged" (the
      merged model's own inputs, the layers before already fitted: one pass
      per kernel; a BatchNorm model keeps its combined statistics during
      these passes).
    merged_apply_fn: `layout -> apply_fn` of the merged architecture (eval
      mode), for `inputs="merged"`; default `apply_fn` itself, right for
      functions whose widths follow their variables' shapes.
    key: for weight matching's random group order.
    chunk: examples per step of the Gram pass (`stats.gram`).
    mesh: devices to shard the passes over.
    progress: log progress.
    report: also return a `Report`.
    compact: return the compact form (`mergejax.merge.compact`): each kernel
      as the blocks it reads, which `compact_apply(apply_fn)` runs at the
      budget's cost; unbatched specs only.

  Returns:
    `(merged variables, layout)`, and the Report when `report`.

  Raises:
    ValueError: before any pass over data, for a budget outside [1, 2] or
      below what the grid reaches, models of different structure or shapes
      (the first differing path named), empty batches, NaN weights, a layer
      the least squares cannot fit; NaN features raise after the pass,
      naming the layer.
  """
  if not (isinstance(budget, (int, float)) and np.isfinite(budget) and 1.0 <= budget <= 2.0):
    raise ValueError(f"pleas: budget must be in [1, 2] (1: one model's cost, 2: both), got {budget!r}")
  if matching not in MATCHINGS:
    raise ValueError(f"pleas: matching must be one of {MATCHINGS}, got {matching!r}")
  if inputs not in ("original", "merged"):
    raise ValueError(f"pleas: inputs must be 'original' or 'merged', got {inputs!r}")
  if cost not in ("flops", "params"):
    raise ValueError(f"pleas: cost must be 'flops' or 'params', got {cost!r}")
  tree.check_same_structure(va, vb)
  tree.check_same_shapes(va, vb)
  tree.check_finite(va, "va")
  tree.check_finite(vb, "vb")
  example, batches = distributed.peek_any_process(mesh, kernels_lib.peek, batches, "pleas")
  batches = kernels_lib.replayable(batches)
  seconds = {}

  start = time.perf_counter()
  spec = spec if spec is not None else trace.permutation_spec(apply_fn, va, example)
  spec_lib.check_spec(spec, va)
  if compact:
    stacked.check_unbatched(spec, "pleas(compact=True)")
  view = kernels_lib.Unrolled.of(spec, apply_fn, va, example)
  flat_spec, fa = view.spec, view.unstack(va)
  heads_models = kernels_lib.head_models(heads, fa)
  kernels, in_axes = view.kernels, view.in_axes
  fixed, terms = view.cost_terms(fa, heads_models, cost)
  options, _ = _options(spec, fixed, grid)
  budget_lib.check_reachable(terms, options, budget)
  seconds["trace"] = time.perf_counter() - start

  start = time.perf_counter()
  if matching == "identity":
    result = align.MatchResult(permute.identity_permutation(spec), jnp.zeros(0), {})
  elif matching == "weight":
    result = align.weight_matching(spec, va, vb, key=key if key is not None else jax.random.key(0))
  else:
    result = align.activation_matching(spec, apply_fn, va, vb, batches, mesh=mesh, progress=progress)
  vb = permute.apply_permutation(spec, result.perm, vb)
  fb = view.unstack(vb)
  flat_result = (result._replace(pair_scores=stacked.unstack_permutation(spec, result.pair_scores))
                 if matching == "activation" else result)  # weight matching's similarity reads the weights
  fb, flat_similarity = jax.block_until_ready((fb, _similarity(flat_spec, flat_result, fa, fb, matching)))
  similarity = {g: flat_similarity[g] if g not in spec.batch_sizes else
                np.stack([flat_similarity[stacked.copy_name(g, i)] for i in range(spec.batch_sizes[g])])
                for g in spec.groups}
  seconds["match"] = time.perf_counter() - start

  start = time.perf_counter()
  alloc, chosen = allocate(spec, terms, similarity, budget, grid=grid, method=allocation, fixed=fixed)
  maps = {g: combine.partial_map(c) if c.ndim == 1 else [combine.partial_map(row) for row in c]
          for g, c in chosen.items()}
  layout = combine.layout_of(maps)
  flat_maps = stacked.unstack_per_copy(spec, maps, "pleas")
  merged = jax.block_until_ready(combine.combine(flat_spec, flat_maps, fa, fb, inputs=in_axes,
                                                 models=heads_models))
  seconds["allocation"] = time.perf_counter() - start
  if progress:
    logging.info("pleas: budget %.3f -> cost %.3f, ratios %s", budget, alloc.cost,
                 {g: round(r, 3) for g, r in alloc.ratios.items()})

  layers = []
  if least_squares_fit:
    fit = functools.partial(_fit_layers, view=view, flat=(fa, fb), kernels=kernels, spec=flat_spec,
                            maps=flat_maps, heads_models=heads_models, ridge=ridge, chunk=chunk, mesh=mesh,
                            progress=progress)
    if inputs == "original":
      merged, layers, seconds["statistics"], seconds["solves"] = fit(apply_fn, va, vb, merged, batches)
    else:
      merged_fn = merged_apply_fn(layout) if merged_apply_fn is not None else apply_fn
      merged, layers, seconds["statistics"], seconds["solves"] = fit(
          apply_fn, va, vb, merged, batches, merged_fn=merged_fn)
  merged = view.stack(merged)

  start = time.perf_counter()
  if build_fn is not None:
    merged = jax.block_until_ready(repair.reset_batch_norm(build_fn(layout), merged, batches()))
  elif isinstance(va, Mapping) and "batch_stats" in va:
    logging.warning("pleas: no build_fn, so the merged BatchNorm statistics are the combined ones, not reset")
  seconds["repair"] = time.perf_counter() - start
  if compact:
    merged = compact_lib.compact_variables(spec, layout, merged, inputs=in_axes, models=heads_models)
  if report:
    return merged, layout, Report(alloc, layers, seconds)
  return merged, layout


@dataclasses.dataclass(frozen=True)
class _DesignRows:
  """`kernels.design_row_fn(apply_fn, kernels)` as a value: a second merge of the same architecture (an
  equal `apply_fn`, `stats.ByValue`) reuses the compiled Gram pass (`stats.gram`)."""

  apply_fn: stats.ByValue
  kernels: tuple[kernels_lib.Kernel, ...]
  unroll_scans: bool

  def __call__(self, variables, x):
    return kernels_lib.design_row_fn(self.apply_fn.fn, self.kernels, unroll_scans=self.unroll_scans)(variables, x)


def _fit_layers(apply_fn, va, vb, merged, batches, *, view, flat, kernels, spec, maps, heads_models, ridge, chunk,
                mesh, progress, merged_fn=None):
  """Every kernel of `merged` by least squares: `(merged, reports, statistics s, solves s)`.

  Without `merged_fn` one pass gathers every layer's Gram of the originals'
  inputs `[X_a | X_b]`. With it (`inputs="merged"`), the layers are fitted in
  order, each from a pass over `[X_m | X_a | X_b]` with `X_m` the inputs
  `merged_fn` gives the layer once the layers before it are fitted.
  `va`, `vb` are the models' variables (the passes run `apply_fn` on them),
  `flat` and `merged` the flat spec's (`view`, `kernels.Unrolled`): a stacked
  kernel's copies are fitted one by one.
  """
  la, lb = (tree.leaves_by_path(v) for v in flat)
  by_leaf = combine.refs_by_leaf(spec)
  seconds = {"statistics": 0.0, "solves": 0.0}

  def timed(stage, fn, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))  # dispatch is asynchronous
    seconds[stage] += time.perf_counter() - start
    return out

  rows_of = lambda fn, ks: _DesignRows(stats.ByValue(fn), tuple(ks), view.unroll)
  if merged_fn is None:
    logging.info("pleas: Gram statistics of %d layers, %.1f MiB", len(kernels),
                 kernels_lib.gram_bytes(kernels) / 2**20)
    grams = timed("statistics", stats.accumulate,
                  stats.gram(rows_of(apply_fn, kernels), chunk=chunk), (va, vb), batches,
                  mesh=mesh, progress=progress)
  solved, layers = {}, []
  for i, k in enumerate(kernels):
    lm = tree.leaves_by_path(merged)
    if merged_fn is None:
      g = grams[i]
    else:
      original_rows = rows_of(apply_fn, [k])
      merged_rows = rows_of(merged_fn, [k._replace(shape=tuple(np.shape(lm[k.path])))])
      # The dict key tells the merged model's variables from the originals' (it is static under jit).
      rows = lambda v, x: merged_rows(v["merged"], x) if "merged" in v else original_rows(v["original"], x)
      (g,) = timed("statistics", stats.accumulate, stats.gram(rows, chunk=chunk),
                   ({"merged": view.stack(merged)}, {"original": va}, {"original": vb}), batches, mesh=mesh,
                   progress=progress)
    where = "/".join(k.path)
    if not np.isfinite(np.asarray(g.gram)).all():  # on the host: no program per Gram shape
      raise ValueError(f"pleas: the features read by {where} have NaN or Inf values")
    pieces = combine.leaf_pieces(k.shape, by_leaf.get(k.path, []), where)
    kernel, rep = timed("solves", least_squares.solve_layer, k.path, g, (la[k.path], lb[k.path]), lm[k.path],
                        pieces, k.plan, maps, models=heads_models.get(k.path, (0, 1)), ridge=ridge,
                        merged_inputs=merged_fn is not None)
    solved[k.path] = kernel
    if merged_fn is not None:
      merged = tree.replace_leaves(merged, {k.path: kernel})
    layers.append(rep)
    if progress:
      logging.info("pleas: %s residual %.4f -> %.4f, condition %.3g, blocks %s", where,
                   rep.residual_before, rep.residual_after, rep.condition, rep.blocks)
  return tree.replace_leaves(merged, solved), layers, seconds["statistics"], seconds["solves"]
