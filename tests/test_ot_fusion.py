"""OT fusion (merge/optimal_transport.py): exact OT against the assignment and an LP oracle,
Sinkhorn's approach to it, and fusions that must give back a known model."""

import sys

import jax
import numpy as np
import pytest
import scipy.optimize

import mergejax as mj
from mergejax.merge import compact
from mergejax.merge import optimal_transport as otf


def _max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda u, v: float(np.abs(np.asarray(u) - np.asarray(v)).max()), a, b)))


def _init(model, x, seed: int):
  """Random variables of `model` from NumPy (no initialiser compiled): N(0, 0.5^2) leaves."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def _duplicated(apply_fn, variables, x, groups):
  """The model with every unit of `groups` twice (copies j and j + n); the
  layers reading a duplicated unit read each copy at half weight: the same function."""
  spec = mj.permutation_spec(apply_fn, variables, x, warn=False)
  inputs = compact.kernel_inputs(apply_fn, variables, x)
  leaves = mj.tree.leaves_by_path(variables)
  for g in groups:
    index = np.tile(np.arange(spec.sizes[g]), 2)
    for r in spec.groups[g]:
      leaf = np.take(np.asarray(leaves[r.path]), index, axis=r.axis)
      leaves[r.path] = leaf / 2 if r.axis in inputs.get(r.path, ()) else leaf
  return mj.tree.replace_leaves(variables, leaves)


@pytest.fixture(scope="module")
def x():
  return np.asarray(jax.random.normal(jax.random.key(1), (16, 8, 8, 1)), np.float32)


@pytest.fixture(scope="module")
def mlp(x):
  """A: hidden (8, 6); W: hidden (16, 12), A's units duplicated; V: hidden (12, 9), its own init."""
  narrow = mj.models.build("mlp", features=(8, 6), num_classes=4)
  wide = mj.models.build("mlp", features=(16, 12), num_classes=4)
  other = mj.models.build("mlp", features=(12, 9), num_classes=4)
  va = _init(narrow, x, 0)
  vw = _duplicated(narrow.apply, va, x, ["params/hidden_0/bias:0", "params/head/kernel:0"])
  return narrow, wide, other, va, vw, _init(other, x, 2)


VIT = dict(patch_size=4, embed_dim=8, depth=1, num_heads=2, head_dim=4, mlp_dim=8, num_classes=3)


@pytest.fixture(scope="module")
def vit(x):
  narrow = mj.models.build("vit", **VIT)
  wide = mj.models.build("vit", **{**VIT, "embed_dim": 16, "num_heads": 4, "mlp_dim": 16})
  va = _init(narrow, x, 0)
  spec = mj.permutation_spec(narrow.apply, va, x, warn=False)
  # The stream, the heads and the MLP double; head_dim (qk, vo) never widens.
  grown = [g for g in spec.groups if g.endswith(("key/bias:0", "key/kernel:0", "mlp_in/bias:0"))]
  return narrow, wide, va, spec, _duplicated(narrow.apply, va, x, grown)


def test_exact_plan_with_equal_widths_is_the_assignment():
  rng = np.random.default_rng(0)
  for n in (1, 5, 9):
    cost = rng.normal(size=(n, n)).astype(np.float32)
    col = np.asarray(mj.lap(cost, maximize=False))
    expected = np.zeros((n, n), np.float32)
    expected[np.arange(n), col] = 1.0 / n
    np.testing.assert_array_equal(np.asarray(otf.transport_plan(cost)), expected)


def test_exact_plan_of_different_widths_is_the_optimal_transport():
  # Oracle: with uniform marginals 1/6 and 1/4, the LP is an assignment of 12 x 12
  # (each row twice, each column three times): its optimum / 12 is the OT cost.
  rng = np.random.default_rng(1)
  cost = rng.random((6, 4))
  plan = np.asarray(otf.transport_plan(cost), np.float64)
  np.testing.assert_allclose(plan.sum(1), 1 / 6, atol=1e-7)
  np.testing.assert_allclose(plan.sum(0), 1 / 4, atol=1e-7)
  assert plan.min() >= 0
  big = np.repeat(np.repeat(cost, 2, axis=0), 3, axis=1)
  rows, cols = scipy.optimize.linear_sum_assignment(big)
  np.testing.assert_allclose((plan * cost).sum(), big[rows, cols].sum() / 12, rtol=1e-6)


def test_sinkhorn_approaches_the_exact_plan_as_epsilon_falls():
  cost = np.random.default_rng(2).random((6, 6)).astype(np.float32)
  exact = np.asarray(otf.transport_plan(cost))
  distances = []
  for epsilon in (1.0, 0.3, 0.1, 0.03, 0.01):
    plan = np.asarray(otf.transport_plan(cost, epsilon=epsilon))
    np.testing.assert_allclose(plan.sum(0), 1 / 6, atol=2e-3)
    distances.append(np.abs(plan - exact).sum())
  assert all(a > b for a, b in zip(distances, distances[1:])), distances
  assert distances[-1] < 0.1 * distances[0], distances


@pytest.mark.parametrize("cost", ["weight", "activation"])
def test_fusing_a_model_with_itself_or_a_permuted_copy_gives_it_back(mlp, x, cost):
  narrow, _, _, va, _, _ = mlp
  spec = mj.permutation_spec(narrow.apply, va, x, warn=False)
  copy = mj.apply_permutation(spec, mj.random_permutation(spec, jax.random.key(3)), va)
  for vb in (va, copy):
    fused, plans = mj.merge.ot_fusion(narrow.apply, va, vb, x, cost=cost)
    assert _max_diff(fused, va) < 1e-6
    assert set(plans) == set(spec.groups)


@pytest.mark.parametrize("cost", ["weight", "activation"])
def test_a_wider_model_of_duplicated_units_fuses_back_to_the_narrow_one(mlp, x, cost):
  narrow, wide, _, va, vw, _ = mlp
  np.testing.assert_allclose(jax.jit(wide.apply)(vw, x), jax.jit(narrow.apply)(va, x), atol=1e-5)  # one function
  fused, plans = mj.merge.ot_fusion(narrow.apply, va, vw, x, cost=cost, apply_fn_b=wide.apply)
  assert {g: p.shape for g, p in plans.items()} == {"params/hidden_0/bias:0": (16, 8),
                                                    "params/head/kernel:0": (12, 6)}
  assert _max_diff(fused, va) < 1e-5
  # B alone (t = 1) is carried onto A's units exactly: B's function at A's width.
  alone, _ = mj.merge.ot_fusion(narrow.apply, va, vw, x, t=1.0, cost=cost, apply_fn_b=wide.apply)
  np.testing.assert_allclose(jax.jit(narrow.apply)(alone, x), jax.jit(wide.apply)(vw, x), atol=1e-5)


def test_a_wider_model_of_its_own_fuses_to_the_narrow_width(mlp, x):
  narrow, _, other, va, _, vo = mlp
  fused, plans = mj.merge.ot_fusion(narrow.apply, va, vo, x, apply_fn_b=other.apply)
  assert jax.tree.map(np.shape, fused) == jax.tree.map(np.shape, va)
  out = jax.jit(narrow.apply)(fused, x)
  assert out.shape == (16, 4) and np.all(np.isfinite(out))
  assert {g: p.shape for g, p in plans.items()} == {"params/hidden_0/bias:0": (12, 8),
                                                    "params/head/kernel:0": (9, 6)}
  for g, p in plans.items():
    np.testing.assert_allclose(np.asarray(p).sum(0), 1 / p.shape[1], atol=1e-6, err_msg=g)
    np.testing.assert_allclose(np.asarray(p).sum(1), 1 / p.shape[0], atol=1e-6, err_msg=g)


def test_vit_heads_stream_and_norms_fuse_back(vit, x):
  narrow, wide, va, spec, vw = vit
  np.testing.assert_allclose(jax.jit(wide.apply)(vw, x), jax.jit(narrow.apply)(va, x), atol=1e-5)
  copy = mj.apply_permutation(spec, mj.random_permutation(spec, jax.random.key(4)), va)
  fused, _ = mj.merge.ot_fusion(narrow.apply, va, copy, x)
  assert _max_diff(fused, va) < 1e-5
  fused, plans = mj.merge.ot_fusion(narrow.apply, va, vw, x, apply_fn_b=wide.apply)
  heads = [g for g in plans if plans[g].shape == (4, 2)]
  assert len(heads) == 1  # whole heads are transported: 4 of the wide model onto 2
  assert _max_diff(fused, va) < 1e-5


def test_sinkhorn_fusion_of_a_permuted_copy_approaches_the_model(x):
  model = mj.models.build("mlp", features=(6, 6), num_classes=4)
  va = _init(model, x, 7)
  spec = mj.permutation_spec(model.apply, va, x, warn=False)
  copy = mj.apply_permutation(spec, mj.random_permutation(spec, jax.random.key(8)), va)
  errors = [_max_diff(mj.merge.ot_fusion(model.apply, va, copy, x, epsilon=e)[0], va) for e in (0.3, 0.03)]
  assert errors[0] > errors[1], errors


def test_bad_inputs_are_refused_naming_what_is_wrong(mlp, x, monkeypatch):
  narrow, wide, _, va, vw, _ = mlp
  with pytest.raises(ValueError, match="cost must be one of"):
    mj.merge.ot_fusion(narrow.apply, va, va, x, cost="euclid")
  with pytest.raises(ValueError, match="epsilon must be"):
    mj.merge.ot_fusion(narrow.apply, va, va, x, epsilon=-1.0)
  with pytest.raises(ValueError, match="t must be"):
    mj.merge.ot_fusion(narrow.apply, va, va, x, t=1.5)
  with pytest.raises(TypeError, match="epslion"):  # ot_fusion passes its options to ot_align, which names them
    mj.merge.ot_fusion(narrow.apply, va, va, x, epslion=0.1)
  with pytest.raises(ValueError, match="non-empty"):
    mj.merge.transport_plan(np.ones(3))
  with pytest.raises(ValueError, match="NaN or Inf"):
    mj.merge.transport_plan(np.array([[0.0, np.nan], [1.0, 0.0]]))
  five = mj.models.build("mlp", features=(16, 12), num_classes=5)
  with pytest.raises(ValueError, match="params/head/bias"):
    mj.merge.ot_fusion(narrow.apply, va, _init(five, x, 0), x, apply_fn_b=five.apply)
  deeper = _init(mj.models.build("mlp", features=(8, 6, 6), num_classes=4), x, 0)
  with pytest.raises(ValueError, match="hidden_2"):
    mj.merge.ot_fusion(narrow.apply, va, deeper, x)
  nan = jax.tree.map(lambda a: a * np.nan, va)
  with pytest.raises(ValueError, match="vb"):
    mj.merge.ot_fusion(narrow.apply, va, nan, x)
  batched = mj.PermutationSpec({"h": [mj.AxisRef(("params", "hidden_0", "kernel"), 1, batch=0)]}, {"h": 8},
                               batch_sizes={"h": 2})
  with pytest.raises(NotImplementedError, match="batched groups"):
    mj.merge.ot_fusion(narrow.apply, va, va, x, spec=batched, spec_b=batched)
  kernel = ("params", "hidden_0", "kernel")
  parted = mj.PermutationSpec({"h": [mj.AxisRef(kernel, 1, part=(0, 4))]}, {"h": 4})
  with pytest.raises(NotImplementedError, match="parts"):
    mj.merge.ot_fusion(narrow.apply, va, va, x, spec=parted, spec_b=parted)
  renamed = mj.PermutationSpec({"other": [mj.AxisRef(kernel, 1)]}, {"other": 8})
  with pytest.raises(ValueError, match=r"differ in groups \['h', 'other'\]"):
    mj.merge.ot_fusion(narrow.apply, va, va, x, spec=mj.PermutationSpec({"h": [mj.AxisRef(kernel, 1)]}, {"h": 8}),
                       spec_b=renamed)
  otf._sinkhorn.cache_clear()
  monkeypatch.setitem(sys.modules, "ott.geometry", None)
  with pytest.raises(ImportError, match=r"mergejax\[ot\]"):
    mj.merge.transport_plan(np.ones((2, 2)), epsilon=0.1)
  otf._sinkhorn.cache_clear()
