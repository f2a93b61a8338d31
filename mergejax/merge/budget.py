"""Budget allocation: merge ratios per group under an exact cost budget.

A merge ratio r_g in [0, 1] per permutation group (the merged fraction of its
units) gives the merged model the relative cost (DESIGN.md, Budget)

    cost(r) = sum_t c_t * (2 - prod_{g in groups_t} r_g) / sum_t c_t

over cost terms t (a kernel's FLOPs, or a leaf's parameters, with the groups
of its axes; a term without groups costs c_t whatever the ratios). Each
group picks one of its options (ratios rounded to whole units) with a loss
(the matching objective lost by merging that many pairs); `allocate` finds
the least total loss whose cost meets the budget, exactly:

    alloc = allocate(terms, options, losses, budget=1.5)   # milp on one-hot choices

The products of ratios of adjacent groups make the program bilinear; with
one-hot choices x[g, j] (binary) each product of two groups is linearised
exactly by continuous w[j] = x[g, j] r_h bounded from above (w[j] <= x[g, j],
sum_j w[j] <= r_h: a larger product only lowers the cost), a product of more
groups by one y per combination of their options with the choices as its
marginals, and `scipy.optimize.milp` (HiGHS) solves it. No commercial solver, and no fallback:
an answer that breaks the budget is an error.
"""

from collections.abc import Mapping, Sequence
import itertools
import math
from typing import NamedTuple

import numpy as np
import scipy.optimize
import scipy.sparse


class CostTerm(NamedTuple):
  """A part of the model whose cost scales with its groups' widths.

  Attributes:
    cost: c_t > 0, the part's cost in one original model.
    groups: the groups of its axes (repeated for a group on two axes); ()
      for a part whose cost does not change.
  """

  cost: float
  groups: tuple[str, ...]


class Allocation(NamedTuple):
  """Merge ratios, their relative cost, and the loss they incur (nan if no losses)."""

  ratios: dict[str, float]
  cost: float
  loss: float


def relative_cost(terms: Sequence[CostTerm], ratios: Mapping[str, float]) -> float:
  """cost(r) relative to one original model (1: all merged; 2: all kept)."""
  total = sum(t.cost for t in terms)
  return sum(t.cost * (2.0 - math.prod(ratios[g] for g in t.groups)) for t in terms) / total


def _check(terms, options, losses=None) -> None:
  if not terms:
    raise ValueError("budget: no cost terms")
  for t in terms:
    if not t.cost > 0:
      raise ValueError(f"budget: a cost term must cost more than 0, got {t}")
    unknown = sorted(set(t.groups) - set(options))
    if unknown:
      raise ValueError(f"budget: a cost term names groups without options: {unknown}")
  for g, opts in options.items():
    opts = np.asarray(opts, np.float64)
    if opts.size == 0:
      raise ValueError(f"budget: group {g!r} has no options")
    if np.any((opts < 0) | (opts > 1)) or not np.all(np.isfinite(opts)):
      raise ValueError(f"budget: group {g!r} has an option outside [0, 1]: {opts.tolist()}")
  if losses is not None:
    if set(losses) != set(options):
      raise ValueError(f"budget: options and losses name different groups: {sorted(set(losses) ^ set(options))}")
    for g in options:
      if len(losses[g]) != len(options[g]):
        raise ValueError(f"budget: group {g!r} has {len(options[g])} options but {len(losses[g])} losses")


def check_reachable(terms: Sequence[CostTerm], options: Mapping[str, Sequence[float]], budget: float) -> None:
  """Raises ValueError for a budget outside [1, 2] or below the cheapest choice."""
  if not (isinstance(budget, (int, float)) and math.isfinite(budget) and 1.0 <= budget <= 2.0):
    raise ValueError(f"budget must be a number in [1, 2], got {budget!r}")
  _check(terms, options)
  cheapest = relative_cost(terms, {g: max(o) for g, o in options.items()})
  if cheapest > budget + 1e-12:
    raise ValueError(f"budget {budget} is below {cheapest:.6f}, the least cost the option grid reaches"
                     " (every group at its largest merge ratio)")


def allocate(
    terms: Sequence[CostTerm],
    options: Mapping[str, Sequence[float]],
    losses: Mapping[str, Sequence[float]],
    budget: float,
    *,
    method: str = "milp",
) -> Allocation:
  """The least-loss choice of one option per group whose cost meets `budget`.

  Args:
    terms: the cost terms.
    options: group -> its possible ratios.
    losses: group -> the loss of each option.
    budget: in [1, 2].
    method: "milp" (exact, `scipy.optimize.milp`) or "brute" (enumeration,
      for small instances and tests).

  Raises:
    ValueError: for bad inputs or an unreachable budget; RuntimeError if the
      solver fails or its answer breaks the budget.
  """
  check_reachable(terms, options, budget)
  _check(terms, options, losses)
  groups = list(options)
  if method == "brute":
    choice = _brute(terms, options, losses, budget, groups)
  elif method == "milp":
    choice = _milp(terms, options, losses, budget, groups)
  else:
    raise ValueError(f"allocate: method must be 'milp' or 'brute', got {method!r}")
  ratios = {g: float(options[g][j]) for g, j in zip(groups, choice)}
  cost = relative_cost(terms, ratios)
  if cost > budget + 1e-9:
    raise RuntimeError(f"allocate: the solver's choice costs {cost:.9f}, over the budget {budget}")
  return Allocation(ratios, cost, float(sum(losses[g][j] for g, j in zip(groups, choice))))


def _brute(terms, options, losses, budget, groups) -> tuple[int, ...]:
  sizes = [len(options[g]) for g in groups]
  if math.prod(sizes) > 1_000_000:
    raise ValueError(f"allocate: {math.prod(sizes)} combinations are too many to enumerate")
  best, best_loss = None, math.inf
  for choice in itertools.product(*(range(s) for s in sizes)):
    ratios = {g: options[g][j] for g, j in zip(groups, choice)}
    if relative_cost(terms, ratios) <= budget + 1e-12:
      loss = sum(losses[g][j] for g, j in zip(groups, choice))
      if loss < best_loss - 1e-12:
        best, best_loss = choice, loss
  return best


def _milp(terms, options, losses, budget, groups) -> tuple[int, ...]:
  """One-hot binary x[g, j] plus continuous variables per product of distinct
  groups (see the module doc); minimise the loss subject to the budget."""
  total = sum(t.cost for t in terms)
  offset = {}
  n = 0
  for g in groups:
    offset[g] = n
    n += len(options[g])
  # Aggregate terms by their distinct groups and powers: cost * prod r_g^{p_g}.
  products: dict[tuple[tuple[str, int], ...], float] = {}
  constant = 0.0
  for t in terms:
    constant += 2.0 * t.cost
    key = tuple(sorted((g, t.groups.count(g)) for g in set(t.groups)))
    products[key] = products.get(key, 0.0) + t.cost
  budget_row: dict[int, float] = {}
  extra_rows = []  # (coefficients dict, lower, upper)
  n_vars = n
  for key, c in products.items():
    if not key:
      constant -= c
      continue
    if len(key) == 1:  # c * r_g^p, linear in x[g, :]
      (g, p), = key
      for j, r in enumerate(options[g]):
        budget_row[offset[g] + j] = budget_row.get(offset[g] + j, 0.0) - c * r**p
      continue
    if len(key) == 2:
      # r_g r_h = sum_j a_j w_j with w_j = x[g, j] r_h, bounded from above only (a larger product only
      # helps the budget): w_j <= x[g, j] and sum_j w_j <= r_h, exact for binaries. g's options carry
      # the continuous w: 11 variables a product on the default grid, where one binary y per
      # combination took 121 (ResNet-50's 52 products: 979 variables against 6,699, the solve 4x faster).
      (g, pg), (h, ph) = key
      b = [options[h][i] ** ph for i in range(len(options[h]))]
      at_most_h = {offset[h] + i: -bi for i, bi in enumerate(b)}
      for j, r in enumerate(options[g]):
        w = n_vars
        n_vars += 1
        budget_row[w] = -c * r**pg
        extra_rows.append(({w: 1.0, offset[g] + j: -max(b)}, -np.inf, 0.0))
        at_most_h[w] = 1.0
      extra_rows.append((at_most_h, -np.inf, 0.0))
      continue
    # Three or more groups: y over every combination of the groups' options, with the one-hot
    # choices as its marginals: exact for binaries, and tight in relaxation.
    marginals = {(i, j): {offset[g] + j: -1.0} for i, (g, _) in enumerate(key) for j in range(len(options[g]))}
    for combo in itertools.product(*(range(len(options[g])) for g, _ in key)):
      y = n_vars
      n_vars += 1
      budget_row[y] = -c * math.prod(options[g][j] ** p for (g, p), j in zip(key, combo))
      for i, j in enumerate(combo):
        marginals[i, j][y] = 1.0
    extra_rows.extend((coeffs, 0.0, 0.0) for coeffs in marginals.values())
  rows, lower, upper = [], [], []
  for g in groups:  # one option per group
    rows.append({offset[g] + j: 1.0 for j in range(len(options[g]))})
    lower.append(1.0)
    upper.append(1.0)
  rows.append(budget_row)
  lower.append(-np.inf)
  upper.append(budget * total - constant + 1e-9 * total)
  for coeffs, lo, hi in extra_rows:
    rows.append(coeffs)
    lower.append(lo)
    upper.append(hi)
  a = scipy.sparse.csr_array(([v for coeffs in rows for v in coeffs.values()],
                              ([i for i, coeffs in enumerate(rows) for _ in coeffs],
                               [k for coeffs in rows for k in coeffs])), shape=(len(rows), n_vars))
  objective = np.zeros(n_vars)
  for g in groups:
    objective[offset[g]:offset[g] + len(options[g])] = losses[g]
  integrality = np.zeros(n_vars)
  integrality[:n] = 1  # the choices; the products' variables are exact once the choices are binary
  result = scipy.optimize.milp(
      objective, integrality=integrality, bounds=scipy.optimize.Bounds(0, 1),
      constraints=scipy.optimize.LinearConstraint(a.tocsr(), lower, upper))
  if not result.success:
    raise RuntimeError(f"allocate: the MILP solver failed: {result.message}")
  x = np.round(result.x[:n]).astype(int)
  return tuple(int(np.argmax(x[offset[g]:offset[g] + len(options[g])])) for g in groups)


def uniform(terms: Sequence[CostTerm], options: Mapping[str, Sequence[float]], budget: float, *,
            losses: Mapping[str, Sequence[float]] | None = None) -> Allocation:
  """One grid index for every group: the least merging whose cost meets the budget.

  `options[g]` are one common grid of ratios rounded per group (ascending, of
  one length).
  """
  check_reachable(terms, options, budget)
  _check(terms, options, losses)
  lengths = {len(o) for o in options.values()}
  if len(lengths) != 1:
    raise ValueError(f"uniform: every group needs the same grid, got lengths {sorted(lengths)}")
  for g, o in options.items():
    if list(o) != sorted(o):
      raise ValueError(f"uniform: group {g!r}'s options are not ascending: {list(o)}")
  for j in range(lengths.pop()):
    ratios = {g: float(o[j]) for g, o in options.items()}
    cost = relative_cost(terms, ratios)
    if cost <= budget + 1e-12:
      loss = math.nan if losses is None else float(sum(losses[g][j] for g in options))
      return Allocation(ratios, cost, loss)
  raise AssertionError("unreachable: check_reachable passed")


def stage_cut(terms: Sequence[CostTerm], order: Sequence[str], budget: float) -> Allocation:
  """The first k groups of `order` merged fully, the rest kept: the least k
  whose cost meets the budget (the ZipIt!-style cut the PLeaS paper compares)."""
  check_reachable(terms, {g: (0.0, 1.0) for g in order}, budget)
  for k in range(len(order) + 1):
    ratios = {g: 1.0 if i < k else 0.0 for i, g in enumerate(order)}
    cost = relative_cost(terms, ratios)
    if cost <= budget + 1e-12:
      return Allocation(ratios, cost, math.nan)
  raise AssertionError("unreachable: check_reachable passed")
