"""Tests for mergejax.io.out_of_core: leaf-by-leaf merges of orbax checkpoints.

Every method merged out of core equals the in-memory merge of the restored
trees; the output appears whole or not at all; errors come before any leaf is
read.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import io
from mergejax import merge
from mergejax.io import checkpoint
from mergejax.io import out_of_core

KEY = jax.random.key(7)
NUM_MODELS = 3


def _base(rng):
  return {
      "params": {
          "dense": {
              "kernel": rng.normal(size=(4, 6)).astype(np.float32),
              "bias": rng.normal(size=(6,)).astype(np.float32),
          },
          "head": {"kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.bfloat16)},
      },
      "batch_stats": {"mean": rng.normal(size=(6,)).astype(np.float32)},
  }


def _fine_tuned(base, rng):
  return jax.tree.map(
      lambda x: jnp.asarray(x + 0.1 * rng.normal(size=x.shape), x.dtype), base
  )


def _fisher_like(tree, rng):
  return jax.tree.map(
      lambda x: np.square(rng.normal(size=x.shape)).astype(np.float32), tree
  )


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """Paths of a base, NUM_MODELS models fine-tuned from it and their Fishers."""
  root = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(0)
  base = _base(rng)
  models = [_fine_tuned(base, rng) for _ in range(NUM_MODELS)]
  return {
      "base": io.save(root / "base", base),
      "models": [io.save(root / f"model_{i}", m) for i, m in enumerate(models)],
      "fishers": [
          io.save(root / f"fisher_{i}", _fisher_like(m, rng)) for i, m in enumerate(models)
      ],
  }


def _in_memory(method, ckpts, n, kwargs):
  models = [io.restore(p) for p in ckpts["models"][:n]]
  fn = getattr(merge, method)
  reads = out_of_core.METHODS[method]
  if reads == "models":
    return fn(models, **kwargs)
  if reads == "curvature":
    return fn(models, [io.restore(p) for p in ckpts["fishers"][:n]], **kwargs)
  return fn(io.restore(ckpts["base"]), models, **kwargs)


def _out_of_core(method, ckpts, n, kwargs, out, **options):
  inputs = {}
  if out_of_core.METHODS[method] == "base":
    inputs["base_path"] = ckpts["base"]
  if out_of_core.METHODS[method] == "curvature":
    inputs["fisher_paths"] = ckpts["fishers"][:n]
  return io.merge_checkpoints(method, ckpts["models"][:n], out, **inputs, **options, **kwargs)


def _assert_trees_equal(got, want, exact):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, x), (_, y) in zip(
      jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
  ):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    if exact:
      assert x.tobytes() == y.tobytes(), path
    else:
      np.testing.assert_allclose(
          x.astype(np.float32), y.astype(np.float32), rtol=1e-6, atol=1e-7, err_msg=str(path)
      )


CASES = [
    ("average", 3, {}),
    ("average", 2, {"weights": [3.0, 1.0]}),
    ("task_arithmetic", 3, {"scale": [0.5, -0.25, 1.0]}),
    ("ties", 3, {"density": 0.3}),
    ("ties", 2, {"density": 0.3, "trim": "global", "scale": 0.8}),
    ("dare", 2, {"drop": 0.5, "key": KEY}),
    ("dare_ties", 2, {"drop": 0.3, "density": 0.5, "key": KEY, "trim": "global"}),
    ("fisher", 2, {"weights": [1.0, 2.0]}),
    ("metric_weighted_average", 3, {"metrics": [0.5, 1.0, 2.0], "penalty": 2.0}),
    ("consensus_task_arithmetic", 3, {"k": 2, "scale": 0.7}),
    ("consensus_ties", 3, {"k": 1, "density": 0.5, "trim": "global"}),
    ("sce", 3, {"density": 0.5}),
    ("pcb", 3, {"density": 0.3, "scope": "tensor"}),
    ("widen", 3, {}),
    ("doge", 2, {"steps": 5, "learning_rate": 0.01, "scale": 0.5}),
    ("ota", 2, {"power": 0.5}),
]


@pytest.mark.parametrize("method,n,kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_equals_the_in_memory_merge(ckpts, tmp_path, method, n, kwargs):
  out = _out_of_core(method, ckpts, n, kwargs, tmp_path / "merged")
  assert out == tmp_path / "merged"
  want = _in_memory(method, ckpts, n, kwargs)
  _assert_trees_equal(io.restore(out), want, exact=method == "average")
  _assert_trees_equal(io.restore(out, like=want), want, exact=method == "average")
  meta = io.load_metadata(out)
  assert meta["leaves"] == checkpoint.leaf_record(want)
  assert meta["merge"]["method"] == method
  assert meta["merge"]["paths"] == [str(p) for p in ckpts["models"][:n]]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary left


@hypothesis.settings(max_examples=5)
@hypothesis.given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 3),
    st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=2), min_size=1, max_size=3),
)
def test_average_equals_numpy_over_random_trees(tmp_path_factory, seed, n, shapes):
  root = tmp_path_factory.mktemp("average")
  rng = np.random.default_rng(seed)
  trees = [
      {"layers": {f"leaf_{j}": rng.normal(size=s).astype(np.float32) for j, s in enumerate(shapes)}}
      for _ in range(n)
  ]
  paths = [io.save(root / f"m{i}", t) for i, t in enumerate(trees)]
  got = io.restore(io.merge_checkpoints("average", paths, root / "merged"))
  _assert_trees_equal(got, merge.average(trees), exact=True)
  reference = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0, dtype=np.float32), *trees)
  _assert_trees_equal(got, reference, exact=False)


@pytest.mark.parametrize("drop", [0.0, 0.4])
def test_global_thresholds_pass_equals_ties_thresholds(ckpts, drop):
  base = io.restore(ckpts["base"])
  models = [io.restore(p) for p in ckpts["models"]]
  key = KEY if drop else None
  inputs = out_of_core._Inputs(ckpts["models"], ckpts["base"], None)
  leaves = out_of_core._common_leaves(inputs.paths())
  got = out_of_core._global_thresholds(inputs, leaves, 0.3, key, drop)
  want = merge.ties_thresholds(base, models, 0.3, drop=drop, key=key)
  np.testing.assert_array_equal(np.float32(got), np.float32(want))
  if not drop:
    taus = [
        np.concatenate([
            np.abs(np.float32(x) - np.float32(b)).ravel()
            for x, b in zip(jax.tree.leaves(m), jax.tree.leaves(base))
        ])
        for m in models
    ]
    k = merge.keep_count(0.3, taus[0].size)
    np.testing.assert_array_equal(np.float32(got), [np.sort(t)[-k] for t in taus])


def test_existing_output_is_kept_unless_overwrite(ckpts, tmp_path):
  out = _out_of_core("average", ckpts, 2, {}, tmp_path / "merged")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    _out_of_core("average", ckpts, 3, {}, out)
  _assert_trees_equal(io.restore(out), _in_memory("average", ckpts, 2, {}), exact=True)
  _out_of_core("average", ckpts, 3, {}, out, overwrite=True)
  _assert_trees_equal(io.restore(out), _in_memory("average", ckpts, 3, {}), exact=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def _fail_on_second_leaf(monkeypatch):
  calls = []  # the dry run, then one call per leaf
  merge_trees = out_of_core._merge_trees

  def failing(*args):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("injected failure")
    return merge_trees(*args)

  monkeypatch.setattr(out_of_core, "_merge_trees", failing)


def _fail_on_finalize(monkeypatch):
  def failing(path):
    raise RuntimeError("injected failure")

  monkeypatch.setattr(out_of_core.partial, "finalize", failing)


@pytest.mark.parametrize("inject", [_fail_on_second_leaf, _fail_on_finalize])
@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_midway_leaves_no_partial_output(ckpts, tmp_path, monkeypatch, inject, existing):
  out = tmp_path / "merged"
  if existing:
    _out_of_core("average", ckpts, 2, {}, out)
  inject(monkeypatch)
  with pytest.raises(RuntimeError, match="injected failure"):
    _out_of_core("average", ckpts, 3, {}, out, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == (["merged"] if existing else [])
  if existing:
    _assert_trees_equal(io.restore(out), _in_memory("average", ckpts, 2, {}), exact=True)


def test_an_invalid_leaf_found_late_leaves_no_output(ckpts, tmp_path):
  rng = np.random.default_rng(1)
  fishers = [io.restore(p) for p in ckpts["fishers"][:2]]
  fishers[1]["params"]["head"]["kernel"] = -_fisher_like(fishers[1]["params"]["head"]["kernel"], rng)
  paths = [ckpts["fishers"][0], io.save(tmp_path / "negative_fisher", fishers[1])]
  with pytest.raises(ValueError, match="params/head/kernel has negative entries"):
    io.merge_checkpoints("fisher", ckpts["models"][:2], tmp_path / "merged", fisher_paths=paths)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["negative_fisher"]


def _different(tmp_path, change):
  base = _base(np.random.default_rng(2))
  change(base)
  return io.save(tmp_path / "different", base)


def _corrupt(tmp_path, item):
  path = io.save(tmp_path / "corrupt", _base(np.random.default_rng(3)))
  (path / item).write_text("{not json")
  return path


ERRORS = [
    (lambda c, t: ("soup", c["models"], {}), ValueError, "unknown method 'soup'"),
    (lambda c, t: ("average", [], {}), ValueError, "at least one checkpoint"),
    (lambda c, t: ("ties", c["models"], {}), ValueError, "ties merges task vectors: pass base_path"),
    (lambda c, t: ("average", c["models"], {"base_path": c["base"]}), ValueError, "average takes no base_path"),
    (lambda c, t: ("fisher", c["models"], {}), ValueError, "3 models, 0 fisher_paths"),
    (lambda c, t: ("fisher", c["models"], {"fisher_paths": c["fishers"][:2]}), ValueError, "3 models, 2 fisher_paths"),
    (lambda c, t: ("average", c["models"], {"fisher_paths": c["fishers"]}), ValueError, "average takes no fisher_paths"),
    (lambda c, t: ("average", [c["models"][0], t / "nowhere"], {}), FileNotFoundError, "nowhere does not exist"),
    (lambda c, t: ("average", [c["models"][0], _corrupt(t, "state/_METADATA")], {}), ValueError, "corrupt is unreadable"),
    (lambda c, t: ("average", [c["models"][0], _corrupt(t, "metadata/metadata")], {}), ValueError, "corrupt is unreadable"),
    (lambda c, t: ("task_arithmetic", c["models"], {"base_path": _different(t, lambda v: v["params"]["dense"].update(bias=np.zeros(7, np.float32)))}),
     ValueError, r"and .*different differ: params/dense/bias: \(6,\) vs \(7,\)"),
    (lambda c, t: ("average", [c["models"][0], _different(t, lambda v: v["params"].update(extra=np.zeros(2, np.float32)))], {}),
     ValueError, "params/extra: in tree 1, not in tree 0"),
    (lambda c, t: ("average", [io.save(t / "listed", {"layers": [np.zeros(2, np.float32)]})], {}), ValueError, "layers/0: only trees of nested dicts"),
    (lambda c, t: ("ties", c["models"], {"base_path": c["base"], "density": 0.0, "trim": "global"}), ValueError, "density must be in"),
    (lambda c, t: ("dare", c["models"], {"base_path": c["base"], "drop": 1.0, "key": KEY}), ValueError, "drop must be in"),
    (lambda c, t: ("average", c["models"], {"weights": [1.0, 2.0]}), ValueError, "3 models but weights"),
    (lambda c, t: ("pcb", c["models"], {"base_path": c["base"]}), ValueError, "scope='global' couples every leaf"),
    (lambda c, t: ("ota", c["models"], {}), ValueError, "ota needs one fisher_paths entry per model"),
]


@pytest.mark.parametrize("arguments,error,match", ERRORS, ids=[e[2][:24] for e in ERRORS])
def test_errors_come_before_any_leaf_is_read(ckpts, tmp_path, monkeypatch, arguments, error, match):
  method, paths, kwargs = arguments(ckpts, tmp_path)
  before = sorted(tmp_path.iterdir())

  def no_read(*args):
    raise AssertionError("a leaf was read before the error")

  monkeypatch.setattr(out_of_core, "_read_leaf", no_read)
  with pytest.raises(error, match=match):
    io.merge_checkpoints(method, paths, tmp_path / "merged", **kwargs)
  assert sorted(tmp_path.iterdir()) == before
