"""Tests for mergejax.lap: optimal as SciPy on random and adversarial costs."""

import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import pytest
import scipy.optimize

from mergejax.lap import lap


def _costs(kind: str, n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if kind == "uniform":
    c = rng.uniform(size=(n, n))
  elif kind == "ties":
    c = rng.integers(0, 2, (n, n))
  elif kind == "constant":
    c = np.full((n, n), 3.0)
  elif kind == "wide":
    c = rng.standard_normal((n, n)) * 10.0 ** rng.integers(-6, 7, (n, n))
  elif kind == "permutation":
    c = np.eye(n)[rng.permutation(n)] * 5 + rng.uniform(size=(n, n)) * 1e-3
  else:  # weight-matching-like: C = A B^T
    a, b = rng.standard_normal((n, 3 * n)), rng.standard_normal((n, 3 * n))
    c = a @ b.T
  return c.astype(np.float32)


def _assert_optimal(c, col, maximize):
  n = len(c)
  assert sorted(np.asarray(col).tolist()) == list(range(n))
  rows, best = scipy.optimize.linear_sum_assignment(c.astype(np.float64), maximize=maximize)
  expected = c.astype(np.float64)[rows, best].sum()
  got = c.astype(np.float64)[np.arange(n), np.asarray(col)].sum()
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * n * np.abs(c).max())


@pytest.mark.parametrize("method", ["jax", "scipy", "auto"])
@pytest.mark.parametrize("kind", ["uniform", "ties", "constant", "wide", "permutation", "product"])
@pytest.mark.parametrize("maximize", [True, False])
def test_optimal_jitted(method, kind, maximize):
  for n, seed in ((1, 0), (2, 1), (7, 2), (40, 3)):
    c = _costs(kind, n, seed)
    col = jax.jit(lambda c: lap(c, maximize=maximize, method=method))(c)
    assert col.dtype == np.int32
    _assert_optimal(c, col, maximize)


@hypothesis.given(st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_jax_solver_matches_scipy_on_random_integers(n, seed):
  c = np.random.default_rng(seed).integers(-5, 6, (n, n)).astype(np.float32)
  _assert_optimal(c, lap(c, method="jax"), True)


@pytest.mark.parametrize("method", ["jax", "scipy"])
def test_under_vmap_and_batched(method):
  costs = np.stack([_costs("uniform", 9, s) for s in range(4)])
  cols = jax.jit(jax.vmap(lambda c: lap(c, method=method)))(costs)
  batched = lap(costs, method=method)
  np.testing.assert_array_equal(cols, batched)
  for c, col in zip(costs, cols):
    _assert_optimal(c, col, True)


def test_bad_input_is_refused():
  with pytest.raises(ValueError, match=r"square .* got shape \(3, 4\)"):
    lap(np.zeros((3, 4)))
  with pytest.raises(ValueError, match="square"):
    lap(np.zeros(3))
  with pytest.raises(ValueError, match="NaN or Inf"):
    lap(np.array([[0.0, np.nan], [1.0, 2.0]]))
  with pytest.raises(ValueError, match="method must be one of"):
    lap(np.zeros((2, 2)), method="auction")
