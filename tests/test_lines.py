"""Tests for mergejax.merge.lines (LiNeS) against NumPy, its identities, the
traced block order, and its errors."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from tests.test_average import assert_trees_close
from tests.test_task_vectors import _leaves
from tests.test_task_vectors import _unflatten


@st.composite
def base_and_models(draw, discrete=None, num=None):
  """(base, [num models, or 1 to 3]): random pytrees whose leaves take few shapes.

  Dicts one or two deep with one to three float32 leaves of shape (), (4,)
  or (2, 3), standard normal or (when `discrete`, or at random when None)
  small integers. The few shapes let the per-leaf compilations be reused
  from one example to the next.
  """
  shapes = draw(st.lists(st.sampled_from([(), (4,), (2, 3)]), min_size=1, max_size=3))
  nested = draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
  num = num or draw(st.integers(1, 3))
  if discrete is None:
    discrete = draw(st.booleans())
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

  def make():
    out = {}
    for i, (shape, deep) in enumerate(zip(shapes, nested)):
      x = rng.integers(-3, 4, shape) if discrete else rng.normal(size=shape)
      (out.setdefault("block", {}) if deep else out)[f"w{i}"] = np.asarray(x, np.float32)
    return out

  return make(), [make() for _ in range(num)]


def reference_depth_scales(num_blocks, alpha, beta):
  """The paper's lambda(l) = alpha + beta (l - 1) / (L - 1), l = 1..L."""
  if num_blocks == 1:
    return np.array([alpha])
  return np.array([alpha + beta * (l - 1) / (num_blocks - 1) for l in range(1, num_blocks + 1)])


def reference_scale(tree, blocks, alpha, beta, num_blocks):
  """Each leaf of `tree` times its block's lambda (alpha outside), float64."""
  scales = reference_depth_scales(num_blocks, alpha, beta)
  return _unflatten(tree, [
      (alpha if blocks[path] is None else scales[blocks[path]]) * x.astype(np.float64)
      for path, x in _leaves(tree)
  ])


def reference_lines(base, models, blocks, alpha, beta, merged=None):
  """base + lambda(l) tau_MTL; tau_MTL = sum of task vectors, or merged - base."""
  bases = _leaves(base)
  if merged is None:
    taus = [sum(x - b for (_, x) in ls) for (_, b), *ls in zip(bases, *map(_leaves, models))]
  else:
    taus = [x - b for (_, b), (_, x) in zip(bases, _leaves(merged))]
  if alpha is None:
    summed = sum(np.abs(sum(x - b for (_, x) in ls)).sum() for (_, b), *ls in zip(bases, *map(_leaves, models)))
    alpha = summed / (len(models) * sum(np.abs(t).sum() for t in taus))
  num_blocks = 1 + max([i for i in blocks.values() if i is not None], default=0)
  scaled = reference_scale(_unflatten(base, taus), blocks, alpha, beta, num_blocks)
  return _unflatten(base, [b + t for (_, b), (_, t) in zip(bases, _leaves(scaled))])


@st.composite
def block_maps(draw, tree):
  """A block index in 0..3, or None, for every leaf path of `tree`."""
  return {path: draw(st.one_of(st.none(), st.integers(0, 3))) for path, _ in _leaves(tree)}


coefficients = st.floats(-2.0, 2.0)


@hypothesis.given(st.integers(1, 12), coefficients, coefficients)
def test_depth_scales_match_the_papers_formula(num_blocks, alpha, beta):
  scales = mj.merge.depth_scales(num_blocks, alpha, beta)
  np.testing.assert_allclose(scales, reference_depth_scales(num_blocks, alpha, beta), rtol=1e-12, atol=1e-12)
  assert scales[0] == alpha
  np.testing.assert_allclose(scales[-1], alpha + beta if num_blocks > 1 else alpha, rtol=1e-12)


@hypothesis.settings(max_examples=8)  # each example compiles anew
@hypothesis.given(st.data(), coefficients, coefficients, st.integers(0, 2))
def test_scale_by_depth_matches_numpy(data, alpha, beta, extra_blocks):
  tree, _ = data.draw(base_and_models())
  blocks = data.draw(block_maps(tree))
  num_blocks = 1 + max([i for i in blocks.values() if i is not None], default=0) + extra_blocks
  got = mj.merge.scale_by_depth(tree, blocks=blocks, alpha=alpha, beta=beta, num_blocks=num_blocks)
  assert_trees_close(got, reference_scale(tree, blocks, alpha, beta, num_blocks))
  # A callable gives the same blocks as the mapping.
  assert_trees_close(
      mj.merge.scale_by_depth(tree, blocks=blocks.get, alpha=alpha, beta=beta, num_blocks=num_blocks),
      got, rtol=0, atol=0,
  )


@hypothesis.settings(max_examples=8)  # each example compiles anew
@hypothesis.given(st.data(), st.one_of(st.none(), coefficients), coefficients, st.booleans())
def test_lines_matches_numpy(data, alpha, beta, ties_merged):
  base, models = data.draw(base_and_models(discrete=False))
  blocks = data.draw(block_maps(base))
  merged = mj.merge.ties(base, models, density=0.5) if ties_merged else None
  got = mj.merge.lines(base, models, blocks=blocks, alpha=alpha, beta=beta, merged=merged)
  assert_trees_close(got, reference_lines(base, models, blocks, alpha, beta, merged), rtol=1e-4, atol=1e-4)


@hypothesis.settings(max_examples=8)  # each example compiles anew
@hypothesis.given(st.data(), coefficients, coefficients)
def test_lines_identities(data, alpha, beta):
  base, models = data.draw(base_and_models())
  blocks = data.draw(block_maps(base))
  # alpha = 1, beta = 0 is task arithmetic at scale 1, whatever the blocks.
  assert_trees_close(
      mj.merge.lines(base, models, blocks=blocks, alpha=1.0, beta=0.0),
      mj.merge.task_arithmetic(base, models, scale=1.0),
  )
  # One block: every leaf is scaled by alpha, whatever beta.
  assert_trees_close(
      mj.merge.lines(base, models, blocks=lambda path: 0, alpha=alpha, beta=beta),
      mj.merge.task_arithmetic(base, models, scale=alpha),
  )
  # The default alpha on the sum of task vectors is 1 / T.
  assert_trees_close(
      mj.merge.lines(base, models, blocks=lambda path: 0, beta=beta),
      mj.merge.task_arithmetic(base, models, scale=1 / len(models)),
  )
  assert mj.merge.multitask_alpha(base, models) == 1 / len(models)


def test_multitask_alpha_normalises_by_the_l1_norms():
  base = {"w": np.zeros(4, np.float32)}
  models = [{"w": np.array([1, -2, 0, 4], np.float32)}, {"w": np.array([1, 2, 0, -1], np.float32)}]
  merged = {"w": np.array([1, 0, 0, 2], np.float32)}  # ||tau_MTL||_1 = 3, ||sum tau||_1 = 2 + 0 + 0 + 3.
  assert mj.merge.multitask_alpha(base, models, merged) == pytest.approx(5 / (2 * 3))


def test_lines_keeps_the_base_dtypes():
  base = {"a": jnp.zeros(8, jnp.bfloat16), "b": jnp.zeros(3, jnp.float32)}
  models = [{"a": jnp.ones(8, jnp.bfloat16), "b": jnp.ones(3, jnp.float32)}] * 2
  merged = mj.merge.lines(base, models, blocks={"a": 0, "b": 1}, beta=0.5)
  assert merged["a"].dtype == jnp.bfloat16 and merged["b"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(merged["a"], np.float32), 1.0)  # 2 tasks at alpha = 1 / 2.
  np.testing.assert_allclose(merged["b"], 2.0)  # The last block at alpha + beta = 1.
  scaled = mj.merge.scale_by_depth(models[0], blocks={"a": None, "b": 1}, alpha=0.25, beta=1.0)
  assert scaled["a"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(scaled["a"], np.float32), 0.25)
  np.testing.assert_allclose(scaled["b"], 1.25)


def _zoo(name, shape, **kwargs):
  model = mj.models.build(name, **kwargs)
  x = jnp.zeros(shape)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return functools.partial(model.apply, train=False), variables, x


def test_resnet20_blocks_come_in_forward_order():
  apply_fn, variables, x = _zoo("resnet20", (1, 8, 8, 3))
  blocks = mj.merge.blocks_in_read_order(jax.jit(apply_fn), variables, x)
  stages = [f"stage{s}_block{b}" for s in range(3) for b in range(3)]
  names = ["stem_conv", "stem_bn", *stages, "head"]
  for path, index in blocks.items():
    assert index == names.index(path.split("/")[1]), path
  # BatchNorm statistics join their layer's block.
  assert blocks["batch_stats/stage1_block0/proj_bn/mean"] == blocks["params/stage1_block0/conv0/kernel"] == 5
  assert len(set(blocks.values())) == 12
  # The first read of every leaf, traced through the jit.
  order = mj.trace.read_order(jax.jit(apply_fn), variables, x)
  assert order[0] == ("params", "stem_conv", "kernel")
  assert order[-2:] == [("params", "head", "kernel"), ("params", "head", "bias")]
  assert len(order) == len(jax.tree.leaves(variables))


def test_mlp_blocks_with_a_key_of_my_own():
  apply_fn, variables, x = _zoo("mlp", (2, 28, 28, 1), features=(8, 8))
  blocks = mj.merge.blocks_in_read_order(apply_fn, variables, x)
  assert blocks == {"params/head/bias": 2, "params/head/kernel": 2, "params/hidden_0/bias": 0,
                    "params/hidden_0/kernel": 0, "params/hidden_1/bias": 1, "params/hidden_1/kernel": 1}
  # The head outside every block (scaled by alpha), as the paper's ViT heads.
  hidden = mj.merge.blocks_in_read_order(
      apply_fn, variables, x, key=lambda path: None if path[1] == "head" else path[1])
  assert hidden["params/head/kernel"] is None and hidden["params/hidden_1/bias"] == 1


def test_unread_leaves_are_outside_the_blocks():
  variables = {"used": jnp.ones(3), "unused": jnp.ones(2)}
  blocks = mj.merge.blocks_in_read_order(lambda v, x: v["used"] * x, variables, jnp.ones(3), key=lambda p: p)
  assert blocks == {"unused": None, "used": 0}


_BASE = {"params": {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}}
_MODEL = {"params": {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}}
_WIDER = {"params": {"a": np.ones(4, np.float32), "b": np.ones(2, np.float32)}}
_BLOCKS = {"params/a": 0, "params/b": 1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"blocks": {"params/a": 0}}, "no block for leaf params/b"),
        ({"blocks": {**_BLOCKS, "params/c": 2}}, "params/c is not a leaf"),
        ({"blocks": {"params/a": -1, "params/b": 0}}, r"params/a has block -1; need an int >= 0"),
        ({"blocks": {"params/a": 0.5, "params/b": 0}}, r"params/a has block 0.5"),
        ({"blocks": lambda path: "first"}, r"params/a has block 'first'"),
        ({"blocks": [0, 1]}, "blocks must be a mapping or a callable"),
        ({"num_blocks": 1}, "num_blocks is 1 but a leaf is in block 1"),
        ({"num_blocks": 0}, r"num_blocks must be an int >= 1"),
        ({"beta": float("nan")}, "beta must be finite"),
        ({"alpha": float("inf")}, "alpha must be finite"),
        ({"merged": _WIDER}, r"merged does not match the base: params/a: \(3,\) vs \(4,\)"),
        ({"merged": _BASE}, "merged: equals the base"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mj.merge.lines(_BASE, [_MODEL], **{"blocks": _BLOCKS, "beta": 0.5, **kwargs})


def test_bad_models_and_keys_are_rejected():
  with pytest.raises(ValueError, match="need at least one model"):
    mj.merge.lines(_BASE, [], blocks=_BLOCKS, beta=0.5)
  with pytest.raises(ValueError, match=r"models\[1\] does not match the base: params/a"):
    mj.merge.lines(_BASE, [_MODEL, _WIDER], blocks=_BLOCKS, beta=0.5)
  with pytest.raises(ValueError, match="no block for leaf params/b"):
    mj.merge.scale_by_depth(_MODEL, blocks={"params/a": 0}, alpha=1.0, beta=0.0)
  with pytest.raises(ValueError, match="alpha must be finite"):
    mj.merge.scale_by_depth(_MODEL, blocks=_BLOCKS, alpha=float("nan"), beta=0.0)
  with pytest.raises(ValueError, match=r"num_blocks must be an int >= 1"):
    mj.merge.depth_scales(0, 1.0, 0.0)
  with pytest.raises(ValueError, match=r"key must be an int >= 1 or a callable"):
    mj.merge.blocks_in_read_order(lambda v, x: v["a"] * x, {"a": jnp.ones(2)}, jnp.ones(2), key=0)
