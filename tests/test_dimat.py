"""DIMAT (mergejax.merge.dimat): mixing matrices, the merge round against NumPy, the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj

D_IN, HIDDEN, D_OUT = 5, 8, 3


def mlp_apply(variables, x):
  """x: f32[batch, D_IN] -> f32[batch, D_OUT], two ReLU layers."""
  h = x
  for name in ("l0", "l1"):
    h = jax.nn.relu(h @ variables[name]["kernel"] + variables[name]["bias"])
  return h @ variables["out"]["kernel"] + variables["out"]["bias"]


def random_mlp(seed: int):
  rng = np.random.default_rng(seed)
  dims = {"l0": (D_IN, HIDDEN), "l1": (HIDDEN, HIDDEN), "out": (HIDDEN, D_OUT)}
  return {name: {"kernel": jnp.asarray(rng.normal(size=d), jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=d[1]) * 0.1, jnp.float32)} for name, d in dims.items()}


@pytest.fixture(scope="module")
def batches():
  x = np.random.default_rng(0).normal(size=(64, D_IN)).astype(np.float32)
  return [x[:32], x[32:]]


@pytest.fixture(scope="module")
def spec(batches):
  return mj.permutation_spec(mlp_apply, random_mlp(0), batches[0])


NO_GROUPS = mj.PermutationSpec({}, {})


def numpy_leaves(v):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(v)]


def assert_trees_close(a, b, atol=1e-5):
  for x, y in zip(numpy_leaves(a), numpy_leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5)


def test_ring_and_complete_mixing_are_the_graphs():
  ring = mj.merge.ring_mixing(5)
  for i in range(5):
    assert np.flatnonzero(ring[i]).tolist() == sorted({(i - 1) % 5, i, (i + 1) % 5})
    np.testing.assert_allclose(ring[i][ring[i] > 0], 1 / 3)
  np.testing.assert_allclose(mj.merge.ring_mixing(2), [[0.5, 0.5], [0.5, 0.5]])
  np.testing.assert_allclose(mj.merge.ring_mixing(1), [[1.0]])
  np.testing.assert_allclose(mj.merge.complete_mixing(4), np.full((4, 4), 0.25))
  for w in (ring, mj.merge.complete_mixing(4), np.eye(3)):
    np.testing.assert_array_equal(mj.merge.check_mixing(w), w.astype(np.float64))


@pytest.mark.parametrize("mixing, n, match", [
    (np.ones((2, 3)) / 3, None, "square"),
    (np.eye(3), 4, "3 x 3 matrix for 4 agents"),
    (np.array([[1.5, -0.5], [-0.5, 1.5]]), None, r"\[0, 1\] = -0.5 is negative"),
    (np.array([[0.5, 0.5], [0.25, 0.75]]), None, "not symmetric"),
    (np.array([[0.5, 0.4], [0.4, 0.5]]), None, "row 0 sums to"),
    (np.array([[np.nan, 1.0], [1.0, 0.0]]), None, "non-finite"),
])
def test_check_mixing_rejects(mixing, n, match):
  with pytest.raises(ValueError, match=match):
    mj.merge.check_mixing(mixing, n)


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_mixing_helpers_reject_bad_counts(n):
  for helper in (mj.merge.ring_mixing, mj.merge.complete_mixing):
    with pytest.raises(ValueError, match="number of agents"):
      helper(n)


def test_round_with_no_groups_is_the_numpy_weighted_average(batches):
  agents = [random_mlp(s) for s in range(4)]
  # A symmetric doubly stochastic W with unequal weights and a zero (agents 0 and 2 are not neighbours).
  w = np.array([[0.5, 0.3, 0.0, 0.2], [0.3, 0.4, 0.1, 0.2], [0.0, 0.1, 0.6, 0.3], [0.2, 0.2, 0.3, 0.3]])
  merged = mj.merge.dimat_round(mlp_apply, agents, w, [batches] * 4, spec=NO_GROUPS)
  leaves = [numpy_leaves(a) for a in agents]
  for i, m in enumerate(merged):
    expected = [sum(w[i, j] * leaves[j][k] for j in range(4)) for k in range(len(leaves[0]))]
    for got, want in zip(numpy_leaves(m), expected, strict=True):
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_round_with_identity_mixing_returns_each_agent(batches, spec):
  agents = [random_mlp(s) for s in range(3)]
  merged = mj.merge.dimat_round(mlp_apply, agents, np.eye(3), [batches] * 3, spec=spec)
  for a, m in zip(agents, merged, strict=True):
    assert_trees_close(a, m, atol=0)


def test_round_on_identical_and_permuted_copies_gives_each_agent_itself(batches):
  # Two identical agents and a permutation of them on the path 0 - 1 - 2: activation matching aligns
  # every neighbour exactly onto the agent, and the W-weighted average of copies of the agent is the
  # agent (agent 1, with W[1, 1] = 0, is the average of its two aligned neighbours alone).
  # The spec is traced (spec=None), as a user would leave it.
  base = random_mlp(2)
  spec = mj.permutation_spec(mlp_apply, base, batches[0])
  permuted = mj.apply_permutation(spec, mj.random_permutation(spec, jax.random.key(3)), base)
  assert not np.allclose(numpy_leaves(permuted)[1], numpy_leaves(base)[1])
  agents = [base, base, permuted]
  path = np.array([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])
  merged = mj.merge.dimat_round(mlp_apply, agents, path, [batches] * 3)
  x = batches[0]
  for a, m in zip(agents, merged, strict=True):
    assert_trees_close(a, m)
    np.testing.assert_allclose(mlp_apply(m, x), mlp_apply(base, x), atol=1e-4, rtol=1e-4)


def test_dimat_merges_then_trains_each_agent_with_its_own_key(batches):
  agents = [random_mlp(s) for s in range(3)]
  calls = []

  def train_fn(variables, agent, round_, key):
    calls.append((agent, round_, jax.random.key_data(key).tolist()))
    return jax.tree.map(lambda v: v + (agent + 1), variables)

  w = mj.merge.complete_mixing(3)
  out, history = mj.merge.dimat(mlp_apply, agents, w, [batches] * 3, train_fn, rounds=2,
                                key=jax.random.key(7), spec=NO_GROUPS,
                                callback=lambda r, a: (r, float(a[0]["out"]["bias"][0])))
  assert [c[:2] for c in calls] == [(i, r) for r in range(2) for i in range(3)]
  assert len({str(c[2]) for c in calls}) == 6  # a fresh key per agent and round
  # NumPy: round r averages the agents, then agent i adds i + 1.
  leaves = [numpy_leaves(a) for a in agents]
  for _ in range(2):
    mean = [sum(a[k] for a in leaves) / 3 for k in range(len(leaves[0]))]
    leaves = [[m + (i + 1) for m in mean] for i in range(3)]
  for got, want in zip(out, leaves, strict=True):
    for g, e in zip(numpy_leaves(got), want, strict=True):
      np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)
  assert [h[0] for h in history] == [0, 1]
  np.testing.assert_allclose(history[1][1], leaves[0][-2][0], rtol=1e-5)  # leaves[-2]: out/bias


def test_dimat_with_no_rounds_returns_the_agents(batches):
  agents = [random_mlp(s) for s in range(2)]
  out, history = mj.merge.dimat(mlp_apply, agents, mj.merge.ring_mixing(2), [batches] * 2,
                                lambda v, *_: v, rounds=0, key=jax.random.key(0))
  assert out == agents and history == []


def test_bad_inputs_raise_before_any_pass(batches, spec):
  agents = [random_mlp(s) for s in range(3)]
  ring = mj.merge.ring_mixing(3)
  wide = random_mlp(0)
  wide["l1"]["bias"] = jnp.zeros(HIDDEN + 1)
  with pytest.raises(ValueError, match="l1"):
    mj.merge.dimat_round(mlp_apply, agents[:2] + [wide], ring, [batches] * 3)
  with pytest.raises(ValueError, match="2 for 3 agents"):
    mj.merge.dimat_round(mlp_apply, agents, ring, [batches] * 2)
  with pytest.raises(ValueError, match=r"batches_per_agent\[1\]: a one-shot iterator"):
    mj.merge.dimat_round(mlp_apply, agents, ring, [batches, iter(batches), batches])
  with pytest.raises(ValueError, match="for 3 agents"):
    mj.merge.dimat_round(mlp_apply, agents, mj.merge.ring_mixing(4), [batches] * 3)
  with pytest.raises(ValueError, match="models: need at least one"):
    mj.merge.dimat_round(mlp_apply, [], np.eye(1), [])
  bad_spec = mj.PermutationSpec({"h": [mj.AxisRef(("l0", "kernel"), 1)]}, {"h": HIDDEN + 1})
  with pytest.raises(ValueError, match="l0"):
    mj.merge.dimat_round(mlp_apply, agents, ring, [batches] * 3, spec=bad_spec)
  with pytest.raises(ValueError, match="rounds"):
    mj.merge.dimat(mlp_apply, agents, ring, [batches] * 3, lambda v, *_: v, rounds=-1, key=jax.random.key(0))
  with pytest.raises(ValueError, match="train_fn"):
    mj.merge.dimat(mlp_apply, agents, ring, [batches] * 3, None, rounds=1, key=jax.random.key(0))
