"""Merges of models sharded over a mesh of 8 CPU devices (FSDP-like: each
kernel's largest axis over a "model" axis): the results equal the unsharded
ones, keep the inputs' shardings, and the compiled per-leaf programs gather
no leaf whole (no all-gather in their HLO)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import permute
from mergejax.merge import task_vectors as tv
from tests.test_average import assert_trees_close
from tests.test_task_vectors import reference_k
from tests.test_task_vectors import reference_kth_largest
from tests.test_task_vectors import reference_task_arithmetic
from tests.test_task_vectors import reference_ties

P = jax.sharding.PartitionSpec
SHAPES = {"in": (16, 64), "out": (64, 8), "bias": (64,)}
NUM_MODELS = 3


@pytest.fixture(scope="module")
def mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:8]), ("model",))


def fsdp(mesh, shape):
  """NamedSharding of a leaf: its largest axis over "model"."""
  axes = [None] * len(shape)
  axes[int(np.argmax(shape))] = "model"
  return jax.sharding.NamedSharding(mesh, P(*axes))


@pytest.fixture(scope="module")
def host_models():
  """(base, [models]) as NumPy float32 trees, ties-free in magnitude."""
  rng = np.random.default_rng(0)
  base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  models = [
      {k: (v + rng.normal(size=v.shape) * 0.1).astype(np.float32) for k, v in base.items()}
      for _ in range(NUM_MODELS)
  ]
  return base, models


@pytest.fixture(scope="module")
def sharded_models(mesh, host_models):
  base, models = host_models
  put = lambda t: {k: jax.device_put(v, fsdp(mesh, v.shape)) for k, v in t.items()}
  return put(base), [put(m) for m in models]


def assert_same_shardings(got, like):
  for k in like:
    assert got[k].sharding.is_equivalent_to(like[k].sharding, like[k].ndim), k


def assert_no_all_gather(jitted, *args, **kwargs):
  hlo = jitted.lower(*args, **kwargs).compile().as_text()
  assert "all-gather" not in hlo
  return hlo


def test_kth_largest_equals_the_sorted_one_with_ties_and_sharded(mesh):
  rng = np.random.default_rng(1)
  # Few distinct values: many ties, zeros, and k across the whole range.
  values = np.abs(rng.integers(-5, 6, size=(3, 8, 64))).astype(np.float32) * 0.37
  sharded = jax.device_put(values, jax.sharding.NamedSharding(mesh, P(None, None, "model")))
  kth = jax.jit(tv._kth_largest)
  for k in (1, 2, 100, 257, 512):
    want = [reference_kth_largest(row, k) for row in values]
    np.testing.assert_array_equal(kth(values, k), want)
    np.testing.assert_array_equal(kth(sharded, k), want)
  hlo = assert_no_all_gather(kth, sharded, 5)
  assert "all-reduce" in hlo  # The counts are reduced over the mesh.


def test_kth_largest_of_parts_is_that_of_their_concatenation(mesh):
  rng = np.random.default_rng(2)
  parts = [np.abs(rng.normal(size=(2,) + s)).astype(np.float32) for s in SHAPES.values()]
  flat = np.concatenate([p.reshape(2, -1) for p in parts], axis=1)
  sharded = [jax.device_put(p, fsdp(mesh, (1,) + p.shape[1:])) for p in parts]
  for k in (1, 700, flat.shape[1]):
    want = [reference_kth_largest(row, k) for row in flat]
    np.testing.assert_array_equal(tv._kth_largest_of_jit(sharded, k), want)
  assert_no_all_gather(tv._kth_largest_of_jit, sharded, 7)


def test_kth_largest_over_more_entries_than_int32_counts_is_refused_before_any_work():
  too_many = [jax.ShapeDtypeStruct((1, 2**30), jnp.float32), jax.ShapeDtypeStruct((1, 2**30), jnp.float32)]
  with pytest.raises(ValueError, match="2147483648 entries per row"):
    jax.eval_shape(tv._kth_largest_of, too_many, jnp.ones((1,), jnp.int32))
  jax.eval_shape(tv._kth_largest_of, too_many[:1], jnp.ones((1,), jnp.int32))  # 2^30 entries fit


@pytest.mark.parametrize("trim", ["tensor", "global"])
def test_sharded_ties_equals_reference_and_keeps_shardings(host_models, sharded_models, trim):
  base, models = sharded_models
  got = mj.merge.ties(base, models, density=0.3, scale=0.8, trim=trim)
  assert_same_shardings(got, base)
  assert_trees_close(got, reference_ties(*host_models, 0.3, 0.8, trim), atol=1e-6)
  assert_trees_close(got, mj.merge.ties(*host_models, density=0.3, scale=0.8, trim=trim), atol=0)


def test_sharded_task_arithmetic_and_dare_keep_shardings(host_models, sharded_models):
  base, models = sharded_models
  got = mj.merge.task_arithmetic(base, models, scale=0.5)
  assert_same_shardings(got, base)
  assert_trees_close(got, reference_task_arithmetic(*host_models, [0.5] * NUM_MODELS), atol=1e-6)
  key = jax.random.key(0)
  got = mj.merge.dare(base, models, drop=0.5, key=key)
  assert_same_shardings(got, base)
  want = reference_task_arithmetic(*host_models, [1.0] * NUM_MODELS, drop=0.5, key=key)
  assert_trees_close(got, want, atol=1e-6)


def test_per_leaf_programs_gather_nothing(sharded_models):
  base, models = sharded_models
  b, xs = base["in"], [m["in"] for m in models]
  keys = jax.random.split(jax.random.key(0), NUM_MODELS)
  convention = tv.CONVENTIONS["mergejax"]
  for leaf_keys in (None, keys):  # TIES and DARE-TIES.
    assert_no_all_gather(
        tv._ties_leaf, b, xs, leaf_keys, reference_k(0.3, b.size), 1.0, 1.0, 0.0,
        convention=convention, aggregate="mean", per_tensor=True)
  assert_no_all_gather(
      tv._ties_leaf, b, xs, None, jnp.ones(NUM_MODELS), 1.0, 1.0, 0.0,
      convention=convention, aggregate="mean", per_tensor=False)
  assert_no_all_gather(tv._task_arithmetic_leaf, b, xs, keys, jnp.ones(NUM_MODELS), 0.5)
  assert_no_all_gather(tv._leaf_magnitudes, b, xs, keys, 0.5)


SPEC = mj.PermutationSpec(
    {"h": [mj.AxisRef(("in",), 1), mj.AxisRef(("bias",), 0), mj.AxisRef(("out",), 0)]}, {"h": 64})


def test_weight_matching_of_sharded_models_is_replicated_and_unchanged(mesh, host_models, sharded_models):
  (a, models), (sa, smodels) = host_models, sharded_models
  got = mj.weight_matching(SPEC, sa, smodels[0])
  replicated = jax.sharding.NamedSharding(mesh, P())
  for leaf in jax.tree.leaves(got):
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
  want = mj.weight_matching(SPEC, a, models[0])
  np.testing.assert_array_equal(got.perm["h"], want.perm["h"])
  np.testing.assert_allclose(got.objective_trace, want.objective_trace, rtol=1e-6)


def test_apply_permutation_keeps_shardings(mesh, host_models, sharded_models):
  base = sharded_models[0]
  perm = {"h": jax.device_put(np.random.default_rng(3).permutation(64).astype(np.int32),
                              jax.sharding.NamedSharding(mesh, P()))}
  got = mj.apply_permutation(SPEC, perm, base)
  assert_same_shardings(got, base)
  want = mj.apply_permutation(SPEC, {"h": np.asarray(perm["h"])}, host_models[0])
  assert_trees_close(got, want, atol=0)


def test_permuting_axes_that_are_not_sharded_gathers_nothing(mesh, host_models):
  """Sharded on the other axis (tensor-parallel-like), a permutation is a
  local gather on every shard, also traced under jit."""
  layout = {"in": P("model", None), "bias": P(), "out": P(None, "model")}
  variables = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, layout[k]))
               for k, v in host_models[0].items()}
  perm = {"h": jax.device_put(np.random.default_rng(4).permutation(64).astype(np.int32),
                              jax.sharding.NamedSharding(mesh, P()))}
  shardings = {k: v.sharding for k, v in variables.items()}
  apply = jax.jit(lambda p, v: mj.apply_permutation(SPEC, p, v), out_shardings=shardings)
  assert_no_all_gather(apply, perm, variables)
  assert_same_shardings(mj.apply_permutation(SPEC, perm, variables), variables)


def _sharded_permutation(x, perm, axis):
  """The compiled program `apply_permutation` runs for `x` (its `axis` sharded) and a concrete perm."""
  mesh_axes = permute._sharded_over(x.sharding, axis)
  rounds, sends, _ = permute._sharded_plan(perm, permute._mesh_size(x.sharding.mesh, mesh_axes))
  index_sharding = jax.sharding.NamedSharding(x.sharding.mesh, P(mesh_axes))
  index = jax.ShapeDtypeStruct(sends.shape, jnp.int32, sharding=index_sharding)
  return permute._sharded_take(x.sharding, axis, mesh_axes, rounds).lower(x, index, index).compile()


PERMUTATIONS = {
    "random": np.random.default_rng(6).permutation(64),
    "reversed": np.arange(64)[::-1],
    "blocks_rolled": np.roll(np.arange(64), 16),
    "identity": np.arange(64),
}


@pytest.mark.parametrize("layout", [P("model", None), P(None, ("model", "other")), P("other", "model")])
def test_permuting_a_sharded_axis_moves_rows_not_the_leaf(layout, monkeypatch):
  """FSDP-like, the permuted axis is the sharded one (also over two mesh axes
  at once, or beside another sharded axis): equal to NumPy's take, same
  sharding, and the compiled program sends rows with collective-permutes,
  never all-gathering the leaf (XLA's own gather does)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("model", "other"))
  axis = 0 if layout[0] == "model" else 1
  shape = {0: (64, 6), 1: (4, 64)}[axis]
  x = np.random.default_rng(7).normal(size=shape).astype(np.float32)
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, layout))
  ref = mj.AxisRef(("x",), axis)
  calls = []
  monkeypatch.setattr(permute, "_take_sharded_axis",
                      lambda *args, run=permute._take_sharded_axis: calls.append(1) or run(*args))
  for name, perm in PERMUTATIONS.items():
    got = mj.apply_permutation(mj.PermutationSpec({"h": [ref]}, {"h": 64}), {"h": perm.astype(np.int32)},
                               {"x": sharded})["x"]
    assert got.sharding == sharded.sharding, name
    np.testing.assert_array_equal(np.asarray(got), np.take(x, perm, axis), err_msg=name)
  assert len(calls) == len(PERMUTATIONS)  # apply_permutation took the sharded path
  hlo = _sharded_permutation(sharded, PERMUTATIONS["random"], axis).as_text()
  assert "all-gather" not in hlo and "collective-permute" in hlo


def test_a_sharded_permutation_sends_only_the_rows_that_change_shards():
  for name, perm in PERMUTATIONS.items():
    rounds, sends, places = permute._sharded_plan(perm, 8)
    assert sends.shape == places.shape == (8, sum(size for _, size in rounds)), name
    offsets = np.cumsum([0] + [size for _, size in rounds])
    sent = sum(int((places[:, a:b] < 8).sum()) for (shift, _), a, b in zip(rounds, offsets, offsets[1:]) if shift)
    assert sent == int((perm // 8 != np.arange(64) // 8).sum()), name  # the rows whose shard changes
    # every output row is written exactly once: the places, less padding, are each shard's rows
    for d in range(8):
      assert sorted(places[d][places[d] < 8].tolist()) == list(range(8)), name
  assert permute._sharded_plan(PERMUTATIONS["identity"], 8)[0] == ((0, 8),)  # nothing moves
  assert permute._sharded_plan(PERMUTATIONS["blocks_rolled"], 8)[0] == ((2, 8),)  # one round, no padding


def test_a_sharded_permutation_holds_a_few_shards_per_device_not_the_leaf(mesh):
  x = jax.device_put(np.zeros((1024, 64), np.float32), jax.sharding.NamedSharding(mesh, P("model")))
  perm = np.random.default_rng(8).permutation(1024)
  shard_bytes = x.nbytes // 8
  ours = _sharded_permutation(x, perm, 0).memory_analysis().temp_size_in_bytes
  xla = jax.jit(lambda x, p: jnp.take(x, p, axis=0), out_shardings=x.sharding).lower(
      x, jax.device_put(perm, jax.sharding.NamedSharding(mesh, P()))).compile()
  assert ours < 3 * shard_bytes <= x.nbytes <= xla.memory_analysis().temp_size_in_bytes


def test_sharded_fisher_and_regmean_merges_keep_shardings_and_gather_nothing(mesh, host_models, sharded_models):
  """Fisher: one elementwise program. RegMean: "in" (16, 64) is split by
  columns and each device solves its own; "out" (64, 8) is split by rows, the
  rows the solve couples, so its kernels go to a column layout and back
  (all-to-alls); XLA's own solve all-gathered both."""
  (_, models), (_, smodels) = host_models, sharded_models
  fishers = [{k: np.abs(v - m0[k]) + 0.1 for k, v in m.items()} for m, m0 in zip(models, models[1:] + models[:1])]
  sfishers = [{k: jax.device_put(v, fsdp(mesh, v.shape)) for k, v in f.items()} for f in fishers]
  got = mj.merge.fisher(smodels, sfishers)
  assert_same_shardings(got, smodels[0])
  assert_trees_close(got, mj.merge.fisher(models, fishers), atol=1e-6)
  merge_fisher = sys.modules["mergejax.merge.fisher"]
  assert_no_all_gather(merge_fisher._fisher_merge, smodels, sfishers, jnp.ones(NUM_MODELS) / NUM_MODELS, 1e-8)
  rng = np.random.default_rng(5)
  grams = []
  for _ in models:
    x, y = rng.normal(size=(32, 16)), rng.normal(size=(32, 64))
    grams.append({("in",): (x.T @ x).astype(np.float32), ("out",): (y.T @ y).astype(np.float32)})
  got = mj.merge.regmean(smodels, grams)
  assert_same_shardings(got, smodels[0])
  assert_trees_close(got, mj.merge.regmean(models, grams), atol=1e-5)
  regmean = sys.modules["mergejax.merge.regmean"]
  for path, layout in ((("in",), "columns"), (("out",), "rows")):
    kernels = tuple(m[path[0]] for m in smodels)
    axes = regmean._column_axes(kernels[0], grams[0][path].shape[0])
    assert axes == ("model",), path
    replicated = jax.sharding.NamedSharding(mesh, P())
    path_grams = tuple(jax.device_put(g[path], replicated) for g in grams)
    hlo = assert_no_all_gather(regmean._sharded_solve(kernels[0].sharding, axes), path_grams, kernels,
                               jnp.float32(0.9))
    assert ("all-to-all" in hlo) == (layout == "rows"), path
