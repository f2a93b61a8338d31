"""ZipIt!'s greedy feature matching (Stoica et al. 2023), on the host.

    m = zip_match(corr, width=n)           # corr: f32[2n, 2n] of concat(f_a, f_b)
    M, U = merge_matrix(m, n), unmerge_matrix(m, n)
    merged = M @ f                         # f32[w], f = concat(f_a, f_b)
    f_approx = U @ merged                  # f32[2n]

Number the concatenated features of both models `0..n-1` (model A) and
`n..2n-1` (model B). Every feature starts as a unit of its own; while there
are more than `width` units, the two units with the highest similarity are
merged into one (the merged feature is the mean of its members). Unlike a
permutation, ZipIt! may merge two features of the *same* model, and (with
`alpha > 0`) a unit may be merged again. Similarities start as `corr` (its
diagonal ignored) and evolve as in the reference implementation
(gstoica27/ZipIt, `matching_functions.py`, `match_tensors_zipit`):

* Each unit has the *model* of its lowest feature (A for any unit holding an
  A feature, else B). Merging units u and v (models p and q) gives the new
  unit the similarity `min(s(u, x), s(v, x))` to every other unit x, then
* `alpha > 0`: that similarity is multiplied by `alpha` (so each further
  merge of a unit costs a factor alpha; `alpha = 1` is no penalty);
  `alpha = 0`: the new unit's similarity to every unit of model p or q is
  -inf instead (no scaling), so a cross-model pair is never merged again.
* `beta`: each model may make at most
  `budget = floor(floor((2n - width) / 2) * beta + 1e-4)` same-model merges
  (p == q); once its budget is spent, every pair of its units has
  similarity -inf. `beta = 0` allows none.

Ties go to the pair whose lowest features come first (the first maximum of
the similarity matrix in row-major order, over units kept at their lowest
feature). ZipIt!'s reduction ratio r is `width = 2n (1 - r)`: its default
r = 0.5 is the full zip `width = n`; `width = 2n` merges nothing. Widths below
n are refused (the greedy process can run out of allowed merges there).

Defaults are the reference's own (`a=0.3, b=0.125` in its signature, which
any caller passing neither gets; its experiment configs set neither); its
ImageNet scripts also run full zips with (a, b) = (1.0, 0) and (0.5, 0.25).
Two places differ from the reference on purpose: with `alpha = 0` it kills
the entries `model * n .. (model + 1) * n - 1` of the *shrunken* similarity
matrix, which after the first merge are no longer that model's units (this
uses units' models); and it tests the budget only after a same-model merge,
so a budget of 0 still allows one per model (this allows exactly `budget`).

Similarities are computed in float64 with a cached best column per row, so a
merge costs O(n) work plus a rescan of the rows whose best partner changed.
"""

import operator
from typing import NamedTuple

import numpy as np

_NEG = -np.inf


class ZipMatch(NamedTuple):
  """ZipIt!'s merge of 2n concatenated features into w merged units.

  Units are ordered by their lowest feature; each unit lists its features in
  increasing order, padded to k columns (k = 2 unless some unit has more than
  two features, which needs `alpha > 0` or a same-model pair) with its first
  feature at weight 0.

  Attributes:
    merge_index: int32[w, k], the concatenated features (A: 0..n-1, B:
      n..2n-1) of each merged unit; a unit of one feature `i` is `(i, i)`.
    merge_weight: f32[w, k], their weights: 1 / (the unit's size) for its
      features, 0 for padding; merged unit p is exactly
      `sum_j merge_weight[p, j] * f[merge_index[p, j]]`.
    unmerge: int32[2n], the merged unit each feature belongs to and is read
      back from (`f[i] ~ merged[unmerge[i]]`).
  """

  merge_index: np.ndarray
  merge_weight: np.ndarray
  unmerge: np.ndarray

  @property
  def width(self) -> int:
    return self.merge_index.shape[0]


def _check(corr: np.ndarray, width, alpha: float, beta: float) -> int:
  if corr.ndim != 2 or corr.shape[0] != corr.shape[1]:
    raise ValueError(f"zip_match: corr must be square f32[2n, 2n], got shape {corr.shape}")
  if corr.shape[0] == 0 or corr.shape[0] % 2:
    raise ValueError(f"zip_match: corr must have an even, non-zero size 2n, got {corr.shape[0]}")
  if not np.all(np.isfinite(corr)):
    raise ValueError("zip_match: corr has NaN or Inf entries")
  scale = max(1.0, float(np.abs(corr).max()))
  if np.abs(corr - corr.T).max() > 1e-4 * scale:
    raise ValueError("zip_match: corr must be symmetric (the correlation of concat(features_a, features_b))")
  try:
    width = operator.index(width)
  except TypeError:
    raise ValueError(f"zip_match: width must be an integer, got {width!r}") from None
  n = corr.shape[0] // 2
  if not n <= width <= 2 * n:
    raise ValueError(f"zip_match: width must be in [n, 2n] = [{n}, {2 * n}], got {width}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"zip_match: alpha must be in [0, 1], got {alpha}")
  if not 0.0 <= beta < np.inf:
    raise ValueError(f"zip_match: beta must be finite and >= 0, got {beta}")
  return width


def same_model_budget(n: int, width: int, beta: float) -> int:
  """Same-model merges each model may make (the reference's formula).

  Args:
    n: features per model.
    width: the merged width.
    beta: ZipIt!'s beta.

  Returns:
    `floor(floor((2n - width) / 2) * beta + 1e-4)`.
  """
  return int(((2 * n - width) // 2) * beta + 1e-4)


def zip_match(corr: np.ndarray, width: int, *, alpha: float = 0.3, beta: float = 0.125) -> ZipMatch:
  """Greedily merges the most similar units until `width` remain.

  Args:
    corr: f32[2n, 2n], the (symmetric) correlation of the concatenated
      features `concat(features_a, features_b)`; the diagonal is ignored.
    width: w in [n, 2n], the number of merged units (n: the full zip).
    alpha: in [0, 1], the factor on a unit's similarities each time it is
      merged; 0 forbids merging a unit again with its models' units.
    beta: >= 0, the fraction of half the merges each model may make within
      itself (see the module docstring).

  Returns:
    ZipMatch with `merge_index` int32[w, k], `merge_weight` f32[w, k] and
    `unmerge` int32[2n].
  """
  corr = np.asarray(corr)
  width = _check(corr, width, float(alpha), float(beta))
  size = corr.shape[0]
  n = size // 2
  c = corr.astype(np.float64)
  s = 0.5 * (c + c.T)
  np.fill_diagonal(s, _NEG)
  model = (np.arange(size) >= n).astype(np.int64)
  alive = np.ones(size, bool)
  members = [[i] for i in range(size)]
  budget = [same_model_budget(n, width, beta)] * 2
  for p in (0, 1):
    if budget[p] <= 0:
      _forbid_within(s, alive & (model == p))
  best = np.argmax(s, axis=1)
  best_val = s[np.arange(size), best]

  for _ in range(size - width):
    u = int(np.argmax(best_val))
    if best_val[u] == _NEG:
      raise RuntimeError("zip_match: no allowed merge left")  # Not reachable for width >= n.
    v = int(best[u])  # v > u: s is symmetric, and u is the first row holding the maximum.
    p, q = model[u], model[v]
    row = np.minimum(s[u], s[v])
    if alpha > 0:
      row *= alpha
    else:
      row[(model == p) | (model == q)] = _NEG
    row[u] = row[v] = _NEG
    s[u], s[:, u] = row, row
    s[v], s[:, v] = _NEG, _NEG
    alive[v] = False
    members[u], members[v] = members[u] + members[v], []

    rescan = alive & ((best == u) | (best == v))  # Row u included: best[u] was v.
    if p == q:
      budget[p] -= 1
      if budget[p] == 0:
        killed = alive & (model == p)
        _forbid_within(s, killed)
        rescan |= killed
    raised = ~rescan & ((row > best_val) | ((row == best_val) & (u < best)))
    best[raised], best_val[raised] = u, row[raised]
    rows = np.flatnonzero(rescan)
    best[rows] = np.argmax(s[rows], axis=1)
    best_val[rows] = s[rows, best[rows]]
    best_val[v] = _NEG

  return _result([members[u] for u in np.flatnonzero(alive)], size)


def _forbid_within(s: np.ndarray, units: np.ndarray) -> None:
  """Sets the similarity of every pair of `units` (bool[2n]) to -inf."""
  idx = np.flatnonzero(units)
  s[np.ix_(idx, idx)] = _NEG


def _result(units: list[list[int]], size: int) -> ZipMatch:
  """The ZipMatch of `units` (lists of features, ordered by lowest feature)."""
  k = max(2, max(len(m) for m in units))
  index = np.empty((len(units), k), np.int32)
  weight = np.zeros((len(units), k), np.float32)
  unmerge = np.empty(size, np.int32)
  for p, m in enumerate(units):
    m = sorted(m)
    index[p] = m + [m[0]] * (k - len(m))
    weight[p, :len(m)] = 1.0 / len(m)
    unmerge[m] = p
  return ZipMatch(index, weight, unmerge)


def _check_match(m: ZipMatch, n: int) -> None:
  if m.unmerge.shape != (2 * n,):
    raise ValueError(f"ZipMatch has {m.unmerge.shape[0]} features, not 2n = {2 * n}")


def merge_matrix(m: ZipMatch, n: int) -> np.ndarray:
  """The dense merge: `merged = M @ f`.

  Args:
    m: a ZipMatch of 2n features.
    n: features per model.

  Returns:
    f32[w, 2n]: row p holds unit p's weights on its features (summing to 1),
    and is zero elsewhere; `M @ unmerge_matrix(m, n)` is the identity.
  """
  _check_match(m, n)
  out = np.zeros((m.width, 2 * n), np.float32)
  rows = np.broadcast_to(np.arange(m.width)[:, None], m.merge_index.shape)
  np.add.at(out, (rows, m.merge_index), m.merge_weight)
  return out


def unmerge_matrix(m: ZipMatch, n: int) -> np.ndarray:
  """The dense unmerge: `f ~ U @ merged`.

  Args:
    m: a ZipMatch of 2n features.
    n: features per model.

  Returns:
    f32[2n, w]: one 1 per row, at column `unmerge[i]` of feature i.
  """
  _check_match(m, n)
  out = np.zeros((2 * n, m.width), np.float32)
  out[np.arange(2 * n), m.unmerge] = 1.0
  return out
