"""Tests for mergejax.io: orbax round trips, metadata, errors before work."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import io

DTYPES = [np.float32, jnp.bfloat16, np.int32, np.float16]


def _random_variables(seed, with_stats=True):
  rng = np.random.default_rng(seed)
  v = {
      "params": {
          f"layer_{i}": {
              "kernel": jnp.asarray(rng.normal(size=(3, 5)), DTYPES[(seed + i) % 4]),
              "bias": jnp.asarray(rng.normal(size=(5,)), np.float32),
          }
          for i in range(3)
      }
  }
  if with_stats:
    v["batch_stats"] = {"bn": {"mean": rng.normal(size=4).astype(np.float32), "var": np.ones(4, np.float32)}}
  return v


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


@hypothesis.settings(max_examples=5)
@hypothesis.given(st.integers(0, 1000), st.booleans())
def test_round_trip_is_bit_identical(tmp_path_factory, seed, with_stats):
  v = _random_variables(seed, with_stats)
  path = io.save(tmp_path_factory.mktemp("ckpt") / "a", v)
  _assert_bit_identical(io.restore(path), v)
  _assert_bit_identical(io.restore(path, like=v), v)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v)
  _assert_bit_identical(io.restore(path, like=abstract), v)


def test_metadata_is_kept_with_a_leaf_record(tmp_path):
  v = _random_variables(0)
  path = io.save(tmp_path / "a", v, metadata={"model": "mlp", "config": {"features": [8, 8]}})
  meta = io.load_metadata(path)
  assert meta["model"] == "mlp" and meta["config"] == {"features": [8, 8]}
  assert meta["leaves"]["params/layer_0/kernel"] == {"shape": [3, 5], "dtype": "float32"}
  with pytest.raises(ValueError, match="reserved"):
    io.save(tmp_path / "b", v, metadata={"leaves": 1})


def test_restore_into_a_different_structure_names_the_leaf(tmp_path):
  v = _random_variables(0)
  path = io.save(tmp_path / "a", v)
  wrong_shape = jax.tree.map(lambda x: x, v)
  wrong_shape["params"]["layer_1"]["bias"] = np.zeros(6, np.float32)
  with pytest.raises(ValueError, match=r"params/layer_1/bias: saved \(5,\) float32 vs target \(6,\) float32"):
    io.restore(path, like=wrong_shape)
  missing = jax.tree.map(lambda x: x, v)
  del missing["batch_stats"]
  with pytest.raises(ValueError, match="batch_stats/bn/mean is in the checkpoint, not in the target"):
    io.restore(path, like=missing)
  extra = jax.tree.map(lambda x: x, v)
  extra["params"]["head"] = {"kernel": np.zeros((2, 2), np.float32)}
  with pytest.raises(ValueError, match="params/head/kernel is not in the checkpoint"):
    io.restore(path, like=extra)
  wrong_dtype = jax.tree.map(lambda x: x, v)
  wrong_dtype["params"]["layer_2"]["bias"] = np.zeros(5, np.float16)
  with pytest.raises(ValueError, match="layer_2/bias: saved \\(5,\\) float32 vs target \\(5,\\) float16"):
    io.restore(path, like=wrong_dtype)


def test_existing_checkpoint_is_not_overwritten_by_default(tmp_path):
  a, b = _random_variables(0), _random_variables(1)
  path = io.save(tmp_path / "a", a)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    io.save(path, b)
  _assert_bit_identical(io.restore(path), a)
  io.save(path, b, overwrite=True)
  _assert_bit_identical(io.restore(path), b)


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    io.restore(tmp_path / "nothing")
  (tmp_path / "foreign").mkdir()
  with pytest.raises(FileNotFoundError, match="is not a mergejax checkpoint"):
    io.load_metadata(tmp_path / "foreign")


def test_failed_save_leaves_nothing_behind(tmp_path):
  with pytest.raises(TypeError):
    io.save(tmp_path / "a", _random_variables(0), metadata={"bad": object()})
  assert list(tmp_path.iterdir()) == []
