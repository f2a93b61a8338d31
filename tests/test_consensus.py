"""Tests for mergejax.merge.consensus: TALL masks, their reconstructions and
Consensus merging against NumPy, their identities, and their errors."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from tests.test_average import assert_trees_close
from tests.test_lines import base_and_models
from tests.test_task_vectors import _leaves
from tests.test_task_vectors import _unflatten
from tests.test_task_vectors import assert_merges_leaf_by_leaf
from tests.test_task_vectors import BAD_INPUT_BASE
from tests.test_task_vectors import BAD_INPUT_MODEL
from tests.test_task_vectors import BAD_INPUT_WIDER
from tests.test_task_vectors import reference_k
from tests.test_task_vectors import reference_kth_largest
from tests.test_task_vectors import reference_thresholds


def reference_multitask(base, models, multitask, density=0.2, trim="tensor", aggregate="mean"):
  """[(taus f32[N, ...], tau_MTL f32[...])] per leaf: the sum, or TIES's
  trim, elect and disjoint mean or sum, in float32 as the library."""
  if multitask == "ties" and trim == "global":
    thresholds = reference_thresholds(base, models, density)
  out = []
  for j, ((_, b), *xs) in enumerate(zip(_leaves(base), *map(_leaves, models))):
    taus = np.stack([x - b for _, x in xs])
    if multitask == "task_arithmetic":
      out.append((taus, taus.sum(axis=0)))
      continue
    if trim == "tensor":
      at = [reference_kth_largest(t, reference_k(density, t.size)) for t in taus]
    else:
      at = thresholds
    trimmed = np.stack([np.where(np.abs(t) >= a, t, 0) for t, a in zip(taus, at)])
    elected = np.sign(trimmed.sum(axis=0))
    agree = (np.sign(trimmed) == elected) & (trimmed != 0)
    total = np.where(agree, trimmed, 0).sum(axis=0)
    count = agree.sum(axis=0)
    merged = total if aggregate == "sum" else np.where(count > 0, total / np.maximum(count, 1), 0)
    out.append((taus, merged.astype(np.float32)))
  return out


def reference_masks(parts, lambdas):
  """[bool[N, ...]] per leaf: |tau_t| >= lambda_t |tau_MTL - tau_t|."""
  lam = np.asarray(lambdas, np.float32)
  return [np.abs(taus) >= lam.reshape((-1,) + (1,) * mtl.ndim) * np.abs(mtl - taus) for taus, mtl in parts]


# Binary fractions, so that lambda_t |d| is exact in float32 and float64.
lambda_values = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0])
# A few settings, so that the per-leaf compilations are reused across examples.
settings = st.sampled_from([
    {"multitask": "task_arithmetic"},
    {"multitask": "ties", "density": 0.5, "trim": "tensor", "aggregate": "mean"},
    {"multitask": "ties", "density": 0.3, "trim": "global", "aggregate": "sum"},
])


@hypothesis.settings(max_examples=8)  # each example may compile anew
@hypothesis.given(base_and_models(num=3), settings, st.lists(lambda_values, min_size=3, max_size=3), st.integers(0, 4))
def test_masks_reconstructions_and_consensus_match_numpy(case, setting, lambdas, k):
  base, models = case
  parts = reference_multitask(base, models, **setting)
  want_masks = reference_masks(parts, lambdas)
  tau = mj.merge.multitask_vector(base, models, **setting)
  assert_trees_close(tau, _unflatten(base, [mtl for _, mtl in parts]))
  masks = mj.merge.tall_masks(base, models, lambdas=lambdas, **setting)
  assert len(masks) == len(models)
  for t, mask in enumerate(masks):
    for (path, got), want in zip(_leaves(mask), want_masks):
      np.testing.assert_array_equal(got, want[t], err_msg=f"mask {t} {path}")
    # Compression: base + m_t tau_MTL.
    want = [b + np.where(m[t], mtl, 0) for (_, b), m, (_, mtl) in zip(_leaves(base), want_masks, parts)]
    assert_trees_close(mj.merge.tall_reconstruct(base, tau, mask), _unflatten(base, want))
  # Consensus: the entries at least k masks select, scaled.
  kept = [m.sum(axis=0) >= k for m in want_masks]
  for (_, got), want in zip(_leaves(mj.merge.consensus_mask(masks, k=k)), kept):
    np.testing.assert_array_equal(got, want)
  want = _unflatten(base, [b + 0.7 * np.where(c, mtl, 0) for (_, b), c, (_, mtl) in zip(_leaves(base), kept, parts)])
  if setting["multitask"] == "task_arithmetic":
    got = mj.merge.consensus_task_arithmetic(base, models, k=k, lambdas=lambdas, scale=0.7)
  else:
    got = mj.merge.consensus_ties(
        base, models, k=k, lambdas=lambdas, scale=0.7, **{n: v for n, v in setting.items() if n != "multitask"})
  assert_trees_close(got, want)


@hypothesis.settings(max_examples=4)  # each example may compile anew
@hypothesis.given(base_and_models(num=2), st.sampled_from(mj.merge.task_vectors.TRIMS))
def test_consensus_and_tall_identities(case, trim):
  base, models = case
  # k = 0 keeps every entry: the unmasked merges.
  assert_trees_close(
      mj.merge.consensus_task_arithmetic(base, models, k=0, scale=0.3),
      mj.merge.task_arithmetic(base, models, scale=0.3),
  )
  assert_trees_close(
      mj.merge.consensus_ties(base, models, k=0, density=0.5, scale=1.5, trim=trim),
      mj.merge.ties(base, models, density=0.5, scale=1.5, trim=trim),
  )
  # More than T masks never agree: the base.
  assert_trees_close(
      mj.merge.consensus_task_arithmetic(base, models, k=len(models) + 1), base, rtol=0, atol=0)
  # With one task, tau_MTL is its task vector, the mask selects everything
  # and the reconstruction is the model.
  (model, *_) = models
  tau = mj.merge.multitask_vector(base, [model])
  (mask,) = mj.merge.tall_masks(base, [model], lambdas=2.0)
  assert all(np.all(m) for m in jax.tree.leaves(mask))
  assert_trees_close(mj.merge.tall_reconstruct(base, tau, mask), model)
  # lambda = 0 selects every entry of every task.
  assert all(np.all(m) for mask in mj.merge.tall_masks(base, models, lambdas=0.0) for m in jax.tree.leaves(mask))


def test_masks_find_each_tasks_support():
  base = {"w": np.zeros(4, np.float32)}
  models = [{"w": np.array([4, 0, 1, 0], np.float32)},
            {"w": np.array([0, 4, 1, 0], np.float32)},
            {"w": np.array([0, 0, 1, 4], np.float32)}]
  # tau_MTL = [4, 4, 3, 4]: each task's own entry, and the shared one, are
  # closer to tau_MTL (distance 0 and 2) than to the base (4 and 1), at
  # lambda 0.5; entries a task never moved are not (0 < 0.5 * 4).
  masks = mj.merge.tall_masks(base, models, lambdas=0.5)
  np.testing.assert_array_equal([m["w"] for m in masks], [[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
  # Only the shared entry is in two masks: k = 2 drops the selfish weights.
  merged = mj.merge.consensus_task_arithmetic(base, models, k=2, lambdas=0.5)
  np.testing.assert_array_equal(merged["w"], [0, 0, 3, 0])


@hypothesis.settings(max_examples=3)  # each example compiles anew
@hypothesis.given(base_and_models(num=3), st.sampled_from([0.3, 0.6]))
def test_one_leaf_at_a_time_reproduces_the_whole_merge(case, density):
  base, models = case
  thresholds = mj.merge.ties_thresholds(base, models, density)
  merges = {
      "consensus_ties_global": lambda b, ms: mj.merge.consensus_ties(
          b, ms, density=density, trim="global", thresholds=thresholds),
      "consensus_ties_tensor": lambda b, ms: mj.merge.consensus_ties(b, ms, density=density),
      "consensus_task_arithmetic": lambda b, ms: mj.merge.consensus_task_arithmetic(b, ms, k=1),
      "tall_mask": lambda b, ms: mj.merge.tall_masks(
          b, ms, multitask="ties", trim="global", thresholds=thresholds)[0],
  }
  for name, merge in merges.items():
    assert_merges_leaf_by_leaf(merge, base, models, name)


def test_masks_pack_into_bits():
  rng = np.random.default_rng(0)
  mask = {"a": rng.random((3, 5)) < 0.5, "b": {"c": rng.random(9) < 0.5, "d": np.zeros((), bool)}}
  packed = mj.merge.pack_mask(mask)
  assert [p.dtype for p in jax.tree.leaves(packed)] == [np.uint8] * 3
  assert [p.size for p in jax.tree.leaves(packed)] == [2, 2, 1]  # ceil(size / 8) bytes.
  unpacked = mj.merge.unpack_mask(packed, mask)
  for got, want in zip(jax.tree.leaves(unpacked), jax.tree.leaves(mask)):
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match=r"packed: a has shape \(2,\), not \(3,\)"):
    mj.merge.unpack_mask(packed, {"a": mask["a"][:, :4].repeat(2, 0), "b": mask["b"]})
  with pytest.raises(ValueError, match="packed does not match like"):
    mj.merge.unpack_mask(packed, {"a": mask["a"]})
  with pytest.raises(ValueError, match="masks.0.: a has dtype float32; masks are boolean"):
    mj.merge.pack_mask({"a": np.zeros(3, np.float32)})


def test_merges_keep_the_base_dtypes():
  base = {"w": jnp.zeros(8, jnp.bfloat16)}
  models = [{"w": jnp.ones(8, jnp.bfloat16)}, {"w": jnp.full(8, 2, jnp.bfloat16)}]
  tau = mj.merge.multitask_vector(base, models)
  assert tau["w"].dtype == jnp.float32
  masks = mj.merge.tall_masks(base, models)
  assert masks[0]["w"].dtype == jnp.bool_
  for merged in (
      mj.merge.consensus_task_arithmetic(base, models),
      mj.merge.consensus_ties(base, models),
      mj.merge.tall_reconstruct(base, tau, masks[0]),
  ):
    assert merged["w"].dtype == jnp.bfloat16


_MASK = {"params": {"dense": {"kernel": np.ones((2, 3), bool)}}}
_MERGES = {
    "multitask_vector": lambda models, **kw: mj.merge.multitask_vector(BAD_INPUT_BASE, models, **kw),
    "tall_masks": lambda models, **kw: mj.merge.tall_masks(BAD_INPUT_BASE, models, **kw),
    "consensus_task_arithmetic": lambda models, **kw: mj.merge.consensus_task_arithmetic(BAD_INPUT_BASE, models, **kw),
    "consensus_ties": lambda models, **kw: mj.merge.consensus_ties(BAD_INPUT_BASE, models, **kw),
}


@pytest.mark.parametrize("name", sorted(_MERGES))
def test_mismatched_or_missing_models_are_named(name):
  with pytest.raises(ValueError, match="need at least one model"):
    _MERGES[name]([])
  with pytest.raises(ValueError, match=r"models\[1\] does not match the base: params/dense/kernel: \(2, 3\) vs \(2, 4\)"):
    _MERGES[name]([BAD_INPUT_MODEL, BAD_INPUT_WIDER])


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("tall_masks", {"lambdas": [0.1, 0.2, 0.3]}, "2 models but 3 lambdas"),
        ("tall_masks", {"lambdas": -0.1}, "lambdas must be finite and >= 0"),
        ("tall_masks", {"lambdas": [0.1, float("nan")]}, "lambdas must be finite and >= 0"),
        ("tall_masks", {"multitask": "sum"}, "multitask must be one of"),
        ("tall_masks", {"thresholds": [0.1, 0.1]}, "pass multitask='ties', trim='global'"),
        ("multitask_vector", {"multitask": "ties", "density": 0.0}, r"density must be in \(0, 1\]"),
        ("multitask_vector", {"multitask": "ties", "trim": "layer"}, "trim must be one of"),
        ("multitask_vector", {"multitask": "ties", "aggregate": "max"}, "aggregate must be one of"),
        ("consensus_task_arithmetic", {"k": -1}, r"k must be an int >= 0"),
        ("consensus_task_arithmetic", {"k": 1.5}, r"k must be an int >= 0"),
        ("consensus_task_arithmetic", {"scale": float("inf")}, "scale must be finite"),
        ("consensus_ties", {"density": 1.5}, r"density must be in \(0, 1\]"),
        ("consensus_ties", {"thresholds": [0.1, 0.1]}, "pass trim='global'"),
        ("consensus_ties", {"trim": "global", "thresholds": [0.1]}, r"2 models but thresholds of shape \(1,\)"),
        ("consensus_ties", {"lambdas": [1.0]}, "2 models but 1 lambdas"),
    ],
)
def test_bad_arguments_are_rejected(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _MERGES[name]([BAD_INPUT_MODEL, BAD_INPUT_MODEL], **kwargs)


def test_bad_masks_are_rejected():
  with pytest.raises(ValueError, match="need at least one mask"):
    mj.merge.consensus_mask([])
  with pytest.raises(ValueError, match=r"masks do not match: params/dense/kernel: \(2, 3\) vs \(2, 4\)"):
    mj.merge.consensus_mask([_MASK, {"params": {"dense": {"kernel": np.ones((2, 4), bool)}}}])
  with pytest.raises(ValueError, match=r"masks\[1\]: params/dense/kernel has dtype float32"):
    mj.merge.consensus_mask([_MASK, BAD_INPUT_MODEL])
  with pytest.raises(ValueError, match="k must be an int >= 0"):
    mj.merge.consensus_mask([_MASK], k=-2)
  with pytest.raises(ValueError, match=r"multitask does not match the base: params/dense/kernel"):
    mj.merge.tall_reconstruct(BAD_INPUT_BASE, BAD_INPUT_WIDER, _MASK)
  with pytest.raises(ValueError, match=r"masks do not match the base: params/dense/kernel"):
    mj.merge.tall_reconstruct(BAD_INPUT_BASE, BAD_INPUT_MODEL, {"params": {"dense": {"kernel": np.ones((2, 4), bool)}}})
  with pytest.raises(ValueError, match=r"masks\[0\]: params/dense/kernel has dtype float32"):
    mj.merge.tall_reconstruct(BAD_INPUT_BASE, BAD_INPUT_MODEL, BAD_INPUT_MODEL)
