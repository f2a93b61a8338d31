"""The permutation PLeaS builds on, chosen by what serves it on held-out data.

A permutation that raises the weights' inner product need not help the least
squares: on pairs of MLPs trained from different seeds on disjoint labels,
weight matching can leave PLeaS below the plain average of the unaligned
weights. `select_matching` merges with each candidate matching ("weight",
"activation", "identity": no permutation) on the fitting data, scores every
merged model with `heldout_score` on data the merge did not read (a held-out
split of the training data, never test data), and keeps the best:

    fit, held = x_train[:800], (x_train[800:], y_train[800:])
    score = lambda merged, layout: loss(mj.models.build("mlp", layout).apply(merged, held[0]), held[1])
    choice = mj.merge.select_matching(model.apply, va, vb, [fit], score, budget=1.0, spec=spec)
    choice.matching, choice.scores      # the chosen matching; each candidate's held-out loss

The choice is per model pair (one matching for every group).
"""

from collections.abc import Callable, Iterable, Sequence
import importlib
import math
from typing import Any, NamedTuple

from mergejax import spec as spec_lib

# The module, not the function `mergejax.merge.pleas` its package exports under the same name.
pleas_lib = importlib.import_module("mergejax.merge.pleas")

PyTree = Any


class Selection(NamedTuple):
  """What `select_matching` chose.

  Attributes:
    matching: the chosen candidate (the lowest held-out score; the first
      listed of a tie).
    scores: candidate -> its merged model's held-out score (lower is better).
    merged: the chosen merge's variables (refitted on `refit_batches` when
      given).
    layout: its MergeLayout.
    report: its `mj.merge.Report`.
  """

  matching: str
  scores: dict[str, float]
  merged: PyTree
  layout: spec_lib.MergeLayout
  report: pleas_lib.Report


def check_candidates(candidates: Sequence[str]) -> tuple[str, ...]:
  """The candidates as a tuple; ValueError for none, unknown or repeated ones."""
  candidates = tuple(candidates)
  if not candidates:
    raise ValueError(f"select_matching: no candidates; give some of {pleas_lib.MATCHINGS}")
  unknown = [c for c in candidates if c not in pleas_lib.MATCHINGS]
  if unknown:
    raise ValueError(f"select_matching: unknown candidates {unknown}; each must be one of {pleas_lib.MATCHINGS}")
  if len(set(candidates)) != len(candidates):
    raise ValueError(f"select_matching: candidates listed twice in {candidates}")
  return candidates


def select_matching(
    apply_fn: Callable[..., Any],
    va: PyTree,
    vb: PyTree,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    heldout_score: Callable[[PyTree, spec_lib.MergeLayout], float],
    *,
    budget: float,
    candidates: Sequence[str] = pleas_lib.MATCHINGS,
    refit_batches: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
    **pleas_options,
) -> Selection:
  """PLeaS with the matching whose merged model scores best on held-out data.

  Args:
    apply_fn, va, vb, budget: as `mj.merge.pleas`.
    batches: the inputs each candidate's merge reads (matching, least
      squares, batch-norm reset); they must not hold the held-out data.
    heldout_score: `(merged variables, layout) -> float`, lower is better:
      e.g. the merged model's loss on a held-out split of the training data,
      or its least-squares residual there. A NaN or infinite score never
      wins.
    candidates: the matchings tried, in order (`mj.merge.pleas`'s
      `matching`): "weight", "activation", "identity".
    refit_batches: when given, the chosen matching is merged once more on
      these (e.g. all the training data, the held-out split included) and
      that merge is returned; otherwise the chosen candidate's own merge.
    **pleas_options: the rest of `mj.merge.pleas`'s keyword arguments
      (`spec`, `heads`, `build_fn`, `ridge`, ...); `report` is always on.

  Returns:
    A `Selection`.

  Raises:
    ValueError: before any merge, for unknown or repeated candidates, or
      `matching` among `pleas_options`; after them, when no candidate
      scored a finite number.
  """
  candidates = check_candidates(candidates)
  if not callable(heldout_score):
    raise TypeError(f"select_matching: heldout_score must be callable, got {type(heldout_score).__name__}")
  if "matching" in pleas_options:
    raise ValueError("select_matching: give the matchings as `candidates`, not `matching`")
  pleas_options = {**pleas_options, "report": True}
  best, best_merge, scores = None, None, {}
  for matching in candidates:  # Holds at most two merges: the best so far and the current one.
    merge = pleas_lib.pleas(apply_fn, va, vb, batches, budget=budget, matching=matching, **pleas_options)
    scores[matching] = float(heldout_score(merge[0], merge[1]))
    if math.isfinite(scores[matching]) and (best is None or scores[matching] < scores[best]):
      best, best_merge = matching, merge
    del merge
  if best is None:
    raise ValueError(f"select_matching: no candidate scored a finite held-out score: {scores}")
  if refit_batches is not None:
    best_merge = None
    best_merge = pleas_lib.pleas(apply_fn, va, vb, refit_batches, budget=budget, matching=best, **pleas_options)
  return Selection(best, scores, *best_merge)
