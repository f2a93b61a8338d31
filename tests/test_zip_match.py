"""Tests for mergejax.merge.zip_match: ZipIt!'s greedy matching against two
plain references, the merge/unmerge identities, and the alpha/beta rules."""

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from mergejax.merge.zip_match import merge_matrix, same_model_budget, unmerge_matrix, zip_match


def _corr(kind: str, n: int, seed: int) -> np.ndarray:
  """A symmetric f32[2n, 2n] similarity of two models' features."""
  rng = np.random.default_rng(seed)
  if kind == "features":
    x = rng.standard_normal((4 * n + 3, 2 * n))
    x[:, n:] += rng.standard_normal() * x[:, :n][:, rng.permutation(n)]
    c = np.corrcoef(x, rowvar=False)
  elif kind == "ties":
    c = rng.integers(-2, 3, (2 * n, 2 * n)) / 2.0
  else:
    c = rng.uniform(-1.0, 1.0, (2 * n, 2 * n))
  c = np.triu(c, 1)
  c = c + c.T + np.eye(2 * n)
  return c.astype(np.float32)


def _model(unit, n):
  return int(min(unit) >= n)


def _reference(corr, width, alpha, beta):
  """ZipIt! step by step: merge the best pair of a shrinking similarity matrix."""
  s = np.array(corr, np.float64)
  size = len(s)
  n = size // 2
  np.fill_diagonal(s, -np.inf)
  units = [[i] for i in range(size)]
  budget = [same_model_budget(n, width, beta)] * 2

  def forbid(p):
    idx = [k for k, u in enumerate(units) if _model(u, n) == p]
    s[np.ix_(idx, idx)] = -np.inf

  for p in (0, 1):
    if budget[p] == 0:
      forbid(p)
  while len(units) > width:
    i, j = divmod(int(np.argmax(s)), len(units))
    assert i < j and np.isfinite(s[i, j])
    p, q = _model(units[i], n), _model(units[j], n)
    row = np.minimum(s[i], s[j])
    if alpha > 0:
      row = row * alpha
    else:
      row[[k for k, u in enumerate(units) if _model(u, n) in (p, q)]] = -np.inf
    s[i], s[:, i] = row, row
    s[i, i] = -np.inf
    units[i] = units[i] + units.pop(j)
    s = np.delete(np.delete(s, j, 0), j, 1)
    if p == q:
      budget[p] -= 1
      if budget[p] == 0:
        forbid(p)
  return [sorted(u) for u in units]


def _pairwise_reference(corr, width, alpha, beta):
  """The same process from feature pairs: s(U, W) is the least over i in U,
  j in W of corr[i, j] times alpha once per merge of i's or j's unit, or -inf
  for a pair banned (by a spent budget, or alpha = 0) while it was apart."""
  c = np.array(corr, np.float64)
  size = len(c)
  n = size // 2
  depth = np.zeros(size, int)
  banned = np.eye(size, dtype=bool)
  units = [[i] for i in range(size)]
  budget = [same_model_budget(n, width, beta)] * 2

  def ban(group_a, group_b):
    for u in group_a:
      for w in group_b:
        banned[np.ix_(u, w)] = banned[np.ix_(w, u)] = True

  def own(p):
    return [u for u in units if _model(u, n) == p]

  for p in (0, 1):
    if budget[p] == 0:
      ban(own(p), own(p))
  while len(units) > width:
    scaled = c.copy()
    if alpha > 0:
      times = depth[:, None] + depth[None, :]
      for t in range(times.max()):
        scaled = np.where(times > t, scaled * alpha, scaled)
    scaled[banned] = -np.inf
    best, pick = -np.inf, None
    for a in range(len(units)):
      for b in range(a + 1, len(units)):
        v = scaled[np.ix_(units[a], units[b])].min()
        if v > best:
          best, pick = v, (a, b)
    a, b = pick
    p, q = _model(units[a], n), _model(units[b], n)
    merged = units[a] + units[b]
    depth[merged] += 1
    units[a] = merged
    del units[b]
    if alpha == 0:
      ban([merged], [u for u in units if u is not merged and _model(u, n) in (p, q)])
    if p == q:
      budget[p] -= 1
      if budget[p] == 0:
        ban(own(p), own(p))
  return [sorted(u) for u in units]


def _units(m):
  return [sorted(set(idx[w > 0].tolist())) for idx, w in zip(m.merge_index, m.merge_weight)]


def _check_structure(m, n, width):
  """Partition, weights, and M @ U = I (M[p] lives exactly on unit p)."""
  assert m.merge_index.dtype == np.int32 and m.unmerge.dtype == np.int32
  assert m.merge_weight.dtype == np.float32
  assert m.merge_index.shape == m.merge_weight.shape == (width, m.merge_index.shape[1])
  assert m.merge_index.shape[1] >= 2 and m.unmerge.shape == (2 * n,)
  units = _units(m)
  assert sorted(i for u in units for i in u) == list(range(2 * n))
  for p, (u, idx, w) in enumerate(zip(units, m.merge_index, m.merge_weight)):
    assert idx.tolist() == u + [u[0]] * (len(idx) - len(u))
    np.testing.assert_array_equal(w, [np.float32(1 / len(u))] * len(u) + [0.0] * (len(w) - len(u)))
    assert u == np.flatnonzero(m.unmerge == p).tolist()
  assert [u[0] for u in units] == sorted(u[0] for u in units)
  mm, uu = merge_matrix(m, n), unmerge_matrix(m, n)
  assert mm.shape == (width, 2 * n) and uu.shape == (2 * n, width)
  np.testing.assert_allclose(mm.sum(1), 1.0, rtol=1e-6)
  for p in range(width):
    assert np.flatnonzero(mm[p]).tolist() == np.flatnonzero(m.unmerge == p).tolist()
  np.testing.assert_allclose(mm @ uu, np.eye(width), atol=1e-6)
  np.testing.assert_array_equal(uu.sum(1), 1.0)
  f = np.random.default_rng(0).standard_normal((2 * n, 3)).astype(np.float32)
  gathered = np.einsum("pk,pkd->pd", m.merge_weight, f[m.merge_index])
  np.testing.assert_allclose(mm @ f, gathered, rtol=1e-5, atol=1e-6)


@hypothesis.settings(max_examples=80)
@hypothesis.given(
    st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from(["features", "uniform", "ties"]),
    st.floats(0.0, 1.0), st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.sampled_from([0.0, 0.125, 0.5, 1.0, 4.0]))
def test_matches_references(n, seed, kind, frac, alpha, beta):
  corr = _corr(kind, n, seed)
  width = n + int(round(frac * n))
  m = zip_match(corr, width, alpha=alpha, beta=beta)
  _check_structure(m, n, width)
  expected = _reference(corr, width, alpha, beta)
  assert _units(m) == expected
  assert _pairwise_reference(corr, width, alpha, beta) == expected


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [1, 5, 16])
def test_identical_models_zip_exactly(alpha, n):
  rng = np.random.default_rng(n)
  fa = rng.standard_normal((8 * n + 4, n))
  r = np.corrcoef(fa, rowvar=False).reshape(n, n)
  np.fill_diagonal(r, 1.0)
  perm = rng.permutation(n)  # B's feature j is A's feature perm[j].
  corr = np.block([[r, r[:, perm]], [r[perm], r[np.ix_(perm, perm)]]]).astype(np.float32)
  m = zip_match(corr, n, alpha=alpha)
  _check_structure(m, n, n)
  inv = np.argsort(perm)
  np.testing.assert_array_equal(m.merge_index, np.stack([np.arange(n), n + inv], 1))
  np.testing.assert_array_equal(m.merge_weight, np.full((n, 2), 0.5, np.float32))
  f = np.concatenate([fa, fa[:, perm]], 1).astype(np.float32).T  # f32[2n, samples]
  merged = merge_matrix(m, n) @ f
  np.testing.assert_array_equal(merged, f[:n])
  np.testing.assert_array_equal(unmerge_matrix(m, n) @ merged, f)


@pytest.mark.parametrize("kind", ["features", "uniform", "ties"])
def test_width_2n_merges_nothing(kind):
  n = 7
  m = zip_match(_corr(kind, n, 3), 2 * n, alpha=0.3, beta=1.0)
  _check_structure(m, n, 2 * n)
  np.testing.assert_array_equal(m.merge_index, np.stack([np.arange(2 * n)] * 2, 1))
  np.testing.assert_array_equal(m.merge_weight, np.tile([[1.0, 0.0]], (2 * n, 1)))
  np.testing.assert_array_equal(m.unmerge, np.arange(2 * n))
  np.testing.assert_array_equal(merge_matrix(m, n), np.eye(2 * n))


@pytest.mark.parametrize("kind", ["features", "uniform", "ties"])
@pytest.mark.parametrize("extra", [0, 3, 8])
def test_no_same_model_merges_and_alpha_0_is_greedy_matching(kind, extra):
  n = 9
  width = n + extra
  corr = _corr(kind, n, 4)
  m = zip_match(corr, width, alpha=0.0, beta=0.0)
  _check_structure(m, n, width)
  # Greedy bipartite matching on the cross block (first maximum on ties),
  # stopped after 2n - width pairs; every other feature stays alone.
  cross = corr[:n, n:].astype(np.float64)
  units = [[i] for i in range(2 * n)]
  for _ in range(2 * n - width):
    i, j = divmod(int(np.argmax(cross)), n)
    units[i], units[n + j] = [i, n + j], None
    cross[i, :] = cross[:, j] = -np.inf
  assert _units(m) == [u for u in units if u is not None]
  if width == n:  # Every feature merged exactly once, with one of the other model.
    assert m.merge_index.shape == (n, 2)
    np.testing.assert_array_equal(m.merge_index[:, 0], np.arange(n))
    assert sorted(m.merge_index[:, 1]) == list(range(n, 2 * n))
    np.testing.assert_array_equal(m.merge_weight, 0.5)


@pytest.mark.parametrize("n", [1, 6])
def test_width_n_merges(n):
  for seed, alpha, beta in [(0, 0.3, 0.125), (1, 0.0, 0.5), (2, 1.0, 1.0)]:
    m = zip_match(_corr("features", n, seed), n, alpha=alpha, beta=beta)
    _check_structure(m, n, n)
    assert sum(len(u) - 1 for u in _units(m)) == n  # n merges, of any units.


def test_alpha_decides_whether_a_unit_merges_again():
  corr = np.full((4, 4), 0.9, np.float32)  # Every pair ties: the first pair wins.
  assert _units(zip_match(corr, 2, alpha=1.0, beta=10.0)) == [[0, 1, 2], [3]]
  assert _units(zip_match(corr, 2, alpha=0.5, beta=10.0)) == [[0, 1], [2, 3]]
  assert _units(zip_match(corr, 2, alpha=0.0, beta=10.0)) == [[0, 1, 2], [3]]
  assert _units(zip_match(corr, 2, alpha=0.0, beta=0.0)) == [[0, 2], [1, 3]]
  m = zip_match(corr, 2, alpha=1.0, beta=10.0)
  np.testing.assert_array_equal(m.merge_index, [[0, 1, 2], [3, 3, 3]])
  np.testing.assert_array_equal(m.merge_weight, np.array([[1, 1, 1], [3, 0, 0]], np.float32) / 3)
  _check_structure(m, 2, 2)


def test_alpha_scales_negative_similarities_up():
  # (1, 2) merge first; alpha lifts their -1s with 0 to -0.5, tying with
  # (0, 3), and the tie goes to the lower pair (0, {1, 2}).
  corr = np.array([[1, -1, -1, -0.5], [-1, 1, 1, -1], [-1, 1, 1, -1], [-0.5, -1, -1, 1]], np.float32)
  assert _reference(corr, 2, 0.5, 10.0) == [[0, 1, 2], [3]]
  assert _units(zip_match(corr, 2, alpha=0.5, beta=10.0)) == [[0, 1, 2], [3]]
  assert _units(zip_match(corr, 2, alpha=0.4, beta=10.0)) == [[0, 1, 2], [3]]
  assert _units(zip_match(corr, 2, alpha=0.6, beta=10.0)) == [[0, 3], [1, 2]]


@pytest.mark.parametrize("beta", [0.0, 0.125, 0.25, 0.5])
def test_beta_caps_same_model_merges(beta):
  n = 16
  rng = np.random.default_rng(5)
  # Within-model similarities beat cross-model ones, so every model spends its budget.
  corr = rng.uniform(-0.2, 0.2, (2 * n, 2 * n))
  corr[:n, :n] += 0.6
  corr[n:, n:] += 0.6
  corr = (np.triu(corr, 1) + np.triu(corr, 1).T + np.eye(2 * n)).astype(np.float32)
  m = zip_match(corr, n, alpha=0.0, beta=beta)
  _check_structure(m, n, n)
  budget = same_model_budget(n, n, beta)
  assert budget == int(n // 2 * beta)
  for p in (0, 1):  # With alpha = 0 a unit holds at most two features of a model.
    own = [sum(p * n <= i < (p + 1) * n for i in u) for u in _units(m)]
    assert max(own) <= 2
    assert sum(k == 2 for k in own) == budget


def test_large_match_is_a_partition():
  n = 400
  m = zip_match(_corr("features", n, 6), n)
  _check_structure(m, n, n)


def test_bad_input_is_refused():
  ok = np.eye(4, dtype=np.float32)
  with pytest.raises(ValueError, match=r"square .* got shape \(4, 6\)"):
    zip_match(np.zeros((4, 6)), 2)
  with pytest.raises(ValueError, match="square"):
    zip_match(np.zeros(4), 2)
  with pytest.raises(ValueError, match="even, non-zero size 2n, got 3"):
    zip_match(np.eye(3), 2)
  with pytest.raises(ValueError, match="even, non-zero"):
    zip_match(np.zeros((0, 0)), 0)
  with pytest.raises(ValueError, match="NaN or Inf"):
    zip_match(np.where(np.eye(4) > 0, np.nan, 0.0), 2)
  with pytest.raises(ValueError, match="symmetric"):
    zip_match(np.triu(np.ones((4, 4))), 2)
  for width in (1, 5, -2):
    with pytest.raises(ValueError, match=r"width must be in \[n, 2n\] = \[2, 4\]"):
      zip_match(ok, width)
  with pytest.raises(ValueError, match="width must be an integer"):
    zip_match(ok, 2.5)
  for alpha in (-0.1, 1.5, np.nan):
    with pytest.raises(ValueError, match="alpha must be in"):
      zip_match(ok, 2, alpha=alpha)
  for beta in (-1.0, np.inf, np.nan):
    with pytest.raises(ValueError, match="beta must be finite"):
      zip_match(ok, 2, beta=beta)
  with pytest.raises(ValueError, match="not 2n = 6"):
    merge_matrix(zip_match(ok, 2), 3)
  with pytest.raises(ValueError, match="not 2n = 2"):
    unmerge_matrix(zip_match(ok, 2), 1)
