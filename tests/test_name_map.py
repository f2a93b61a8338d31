"""Tests for mergejax.io.name_map: a torch-like state dict onto a small Flax linen module and back.

Oracle: a NumPy forward pass written in torch's layouts (OIHW convolution,
`x @ W.T + b` linear layers) on the state dict equals the Flax module's
output on the mapped variables; the inverse round-trips bit-exactly; every
check happens before a tensor is read.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mergejax import io
from mergejax.io import name_map
from mergejax.io import state_dict


class Small(nn.Module):
  """Conv -> ReLU -> spatial mean -> Dense -> LayerNorm -> Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
    x = nn.Dense(5)(x.mean((1, 2)))
    return nn.Dense(2)(nn.LayerNorm(epsilon=1e-5)(x))


RULES = [
    (r"features\.conv\.weight", "params/Conv_0/kernel", "oihw_to_hwio"),
    (r"features\.conv\.bias", "params/Conv_0/bias"),
    (r"fc\.(?P<i>\d+)\.weight", "params/Dense_{i}/kernel", "T"),
    (r"fc\.(?P<i>\d+)\.bias", "params/Dense_{i}/bias"),
    (r"norm\.weight", "params/LayerNorm_0/scale"),
    (r"norm\.bias", "params/LayerNorm_0/bias"),
]
X = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype(np.float32)


def _torch_like_state(dtype=np.float32):
  rng = np.random.default_rng(0)
  shapes = {"features.conv.weight": (4, 3, 3, 3), "features.conv.bias": (4,), "fc.0.weight": (5, 4),
            "fc.0.bias": (5,), "norm.weight": (5,), "norm.bias": (5,), "fc.1.weight": (2, 5), "fc.1.bias": (2,)}
  return {n: rng.normal(size=s).astype(dtype) for n, s in shapes.items()}


def _numpy_forward(state, x):
  """The module's function in torch's layouts: NHWC input, OIHW convolution with zero padding 1."""
  w, b = state["features.conv.weight"], state["features.conv.bias"]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h = np.zeros(x.shape[:3] + (w.shape[0],), np.float64)
  for dy in range(3):
    for dx in range(3):
      h += np.einsum("nhwi,oi->nhwo", padded[:, dy:dy + 6, dx:dx + 6], w[:, :, dy, dx])
  h = np.maximum(h + b, 0).mean((1, 2))
  h = h @ state["fc.0.weight"].T + state["fc.0.bias"]
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  h = h * state["norm.weight"] + state["norm.bias"]
  return h @ state["fc.1.weight"].T + state["fc.1.bias"]


@pytest.fixture(scope="module")
def like():
  return jax.eval_shape(Small().init, jax.random.key(0), X)


def _lazy(state, reads):
  """`state` as LazyTensors that record each read."""
  return {n: state_dict.LazyTensor(x.shape, x.dtype, lambda n=n, x=x: reads.append(n) or x, n)
          for n, x in state.items()}


def test_mapped_variables_compute_the_torch_layout_function(like):
  state = _torch_like_state()
  reads = []
  variables = io.NameMap(RULES).to_variables(_lazy(state, reads), like)
  assert sorted(reads) == sorted(state)  # each tensor read once
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, like)
  np.testing.assert_allclose(Small().apply(variables, X), _numpy_forward(state, X), rtol=1e-5, atol=1e-5)


def test_the_inverse_round_trips_bit_exactly(like):
  state = _torch_like_state()
  nm = io.NameMap(RULES)
  back = nm.from_variables(nm.to_variables(state, like))
  assert sorted(back) == sorted(state)
  for name, x in state.items():
    assert back[name].shape == x.shape and back[name].tobytes() == x.tobytes(), name


def test_the_report_lists_unmatched_keys_and_paths_before_any_read(like):
  state = _torch_like_state()
  state["num_batches_tracked"] = np.zeros((), np.int64)
  state["fc.7.bias"] = np.zeros(2, np.float32)
  del state["norm.bias"]
  reads = []
  nm = io.NameMap(RULES)
  report = nm.match(_lazy(state, reads), like)
  assert report.unmatched_keys == ["num_batches_tracked", "fc.7.bias (-> params/Dense_7/bias, not in the target)"]
  assert report.unmatched_paths == ["params/LayerNorm_0/bias"] and not report.problems
  assert report.pairs["fc.1.weight"] == "params/Dense_1/kernel"
  with pytest.raises(ValueError, match=r"(?s)tensors no rule maps to a target leaf: \['num_batches_tracked'.*"
                                       r"target leaves no tensor maps to: \['params/LayerNorm_0/bias'\]"):
    nm.to_variables(_lazy(state, reads), like)
  with pytest.raises(ValueError, match=r"no array for: \['params/LayerNorm_0/bias'\]"):
    nm.to_variables(_lazy(state, reads), like, allow_unmatched=True)
  assert not reads
  rng = np.random.default_rng(3)
  initialised = jax.tree.map(lambda l: rng.normal(size=l.shape).astype(l.dtype), like)
  variables = nm.to_variables(state, initialised, allow_unmatched=True)
  np.testing.assert_array_equal(variables["params"]["LayerNorm_0"]["bias"],
                                initialised["params"]["LayerNorm_0"]["bias"])
  np.testing.assert_array_equal(variables["params"]["LayerNorm_0"]["scale"], state["norm.weight"])


def test_shapes_dtypes_and_collisions_are_problems_named_before_any_read(like):
  reads = []
  state = _torch_like_state()
  state["fc.0.weight"] = state["fc.0.weight"].T.copy()  # (4, 5): a Linear weight not transposed
  state["features.conv.bias"] = state["features.conv.bias"].astype(ml_dtypes.bfloat16)
  state["fc.1.bias"] = state["fc.1.bias"].astype(np.int32)
  rules = RULES + [(r"norm\.alias", "params/LayerNorm_0/bias")]
  state["norm.alias"] = state["norm.bias"]
  report = io.NameMap(rules).match(_lazy(state, reads), like)
  assert report.problems == [
      "features.conv.bias -> params/Conv_0/bias: dtype bfloat16, the target's is float32 (pass cast=True to cast)",
      "fc.0.weight -> params/Dense_0/kernel: shape (4, 5) (after the transform (5, 4)) does not fit the"
      " target's (4, 5)",
      "fc.1.bias -> params/Dense_1/bias: dtype int32, the target's is float32 (pass cast=True to cast)",
      "norm.bias and norm.alias both map to params/LayerNorm_0/bias",
  ]
  with pytest.raises(ValueError, match="fc.0.weight -> params/Dense_0/kernel: shape"):
    io.NameMap(rules).to_variables(_lazy(state, reads), like, cast=True)
  assert not reads
  int_like = jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, jnp.int32), like)
  with pytest.raises(ValueError, match="fc.1.bias -> params/Dense_1/bias: dtype float32 cannot be cast to the"
                                       " target's int32"):
    io.NameMap(RULES).to_variables(_torch_like_state(), int_like, cast=True)


def test_cast_on_request(like):
  state = {n: x.astype(ml_dtypes.bfloat16) for n, x in _torch_like_state().items()}
  with pytest.raises(ValueError, match="pass cast=True"):
    io.NameMap(RULES).to_variables(state, like)
  variables = io.NameMap(RULES).to_variables(state, like, cast=True)
  kernel = variables["params"]["Dense_0"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, state["fc.0.weight"].astype(np.float32).T)


def test_a_custom_transform_and_the_built_in_ones():
  split = name_map.Transform(lambda x: x.reshape(2, 3, 4), lambda x: x.reshape(6, 4))
  nm = io.NameMap([(r"qkv", "params/attn/kernel", split), (r"conv1d", "params/conv/kernel", "oiw_to_wio")])
  state = {"qkv": np.arange(24, dtype=np.float32).reshape(6, 4),
           "conv1d": np.arange(30, dtype=np.float32).reshape(5, 2, 3)}
  like = {"params": {"attn": {"kernel": jax.ShapeDtypeStruct((2, 3, 4), jnp.float32)},
                     "conv": {"kernel": jax.ShapeDtypeStruct((3, 2, 5), jnp.float32)}}}
  variables = nm.to_variables(state, like)
  np.testing.assert_array_equal(variables["params"]["conv"]["kernel"][2, 1, 4], state["conv1d"][4, 1, 2])
  back = nm.from_variables(variables)
  for name in state:
    np.testing.assert_array_equal(back[name], state[name])
  hwio = name_map.TRANSFORMS["oihw_to_hwio"]
  w = np.random.default_rng(0).normal(size=(4, 3, 2, 5))
  assert hwio.forward(w)[1, 4, 2, 3] == w[3, 2, 1, 4]
  np.testing.assert_array_equal(hwio.inverse(hwio.forward(w)), w)


def test_rule_errors_name_the_rule(like):
  with pytest.raises(ValueError, match=r"rule 0 .*unknown transform 'transpose'"):
    io.NameMap([("w", "params/w", "transpose")])
  with pytest.raises(ValueError, match=r"rule 0 .*path fields \['j'\] are not named groups"):
    io.NameMap([(r"fc\.(?P<i>\d+)", "params/Dense_{j}/kernel")])
  with pytest.raises(ValueError, match="rule 0 .*pattern is not a regular expression"):
    io.NameMap([("fc.(", "params/x")])
  variables = io.NameMap(RULES).to_variables(_torch_like_state(), like)
  alternation = [(r"fc\.(?P<i>\d+)\.(weight|kernel)", "params/Dense_{i}/kernel", "T")] + RULES
  with pytest.raises(ValueError, match="rule 0 .*cannot be written back from params/Dense_0/kernel"):
    io.NameMap(alternation).from_variables(variables)
  shadowed = [RULES[0], (r"features\.conv\.weight", "params/Conv_0/bias")]
  with pytest.raises(ValueError, match=r"params/Conv_0/bias -> features.conv.weight by rule 1, but"
                                       " features.conv.weight maps to params/Conv_0/kernel"):
    io.NameMap(shadowed).from_variables(variables)
  with pytest.raises(ValueError, match=r"leaves no rule's path matches: \['params/LayerNorm_0/bias'"):
    io.NameMap(RULES[:4]).from_variables(variables)
  assert "norm.weight" not in io.NameMap(RULES[:4]).from_variables(variables, allow_unmatched=True)
