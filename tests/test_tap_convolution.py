"""tap_convolution: the tap sum equals XLA's convolution, and is chosen only for windows larger than outputs."""

from hypothesis import given, settings, strategies as st
import jax
from jax import lax
import numpy as np
import pytest

from mergejax import tap_convolution
from mergejax import trace

jax.config.update("jax_default_matmul_precision", "highest")


def _params(x_shape, w_shape, strides, padding, lhs_dilation, rhs_dilation, dn, groups):
  dims = lax.conv_dimension_numbers(x_shape, w_shape, dn)
  return dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              dimension_numbers=dims, feature_group_count=groups, batch_group_count=1)


@st.composite
def _convolutions(draw):
  spatial = draw(st.sampled_from([1, 2]))
  groups = draw(st.sampled_from([1, 2]))
  sizes = [draw(st.integers(1, 5)) for _ in range(spatial)]
  window = [draw(st.integers(1, 4)) for _ in range(spatial)]
  strides = tuple(draw(st.integers(1, 3)) for _ in range(spatial))
  lhs_dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(spatial))
  rhs_dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(spatial))
  padding = tuple((draw(st.integers(-1, 3)), draw(st.integers(-1, 3))) for _ in range(spatial))
  # The output must have at least one position in every spatial dimension.
  for n, k, (lo, hi), ld, rd in zip(sizes, window, padding, lhs_dilation, rhs_dilation):
    if (n - 1) * ld + 1 + lo + hi < (k - 1) * rd + 1:
      padding = None
  if padding is None:
    padding = tuple(((k - 1) * rd, (k - 1) * rd) for k, rd in zip(window, rhs_dilation))
  letters = "HW"[:spatial] if spatial == 2 else "H"
  layout = draw(st.sampled_from(["channels_last", "channels_first"]))
  dn = (("N" + letters + "C", letters + "IO", "N" + letters + "C") if layout == "channels_last" else
        ("NC" + letters, "OI" + letters, "NC" + letters))
  cin, cout = 2 * groups, 3 * groups
  x_shape = (2, *sizes, cin) if layout == "channels_last" else (2, cin, *sizes)
  w_shape = (*window, cin // groups, cout) if layout == "channels_last" else (cout, cin // groups, *window)
  seed = draw(st.integers(0, 2**16))
  return x_shape, w_shape, _params(x_shape, w_shape, strides, padding, lhs_dilation, rhs_dilation, dn, groups), seed


@settings(max_examples=25, deadline=None)
@given(_convolutions())
def test_tap_sum_equals_the_convolution(case):
  x_shape, w_shape, params, seed = case
  rng = np.random.default_rng(seed)
  x, w = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(w_shape).astype(np.float32)
  expected = lax.conv_general_dilated(x, w, **params)
  got = jax.jit(lambda x, w: tap_convolution.tap_sum(x, w, **params))(x, w)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_window_larger_than_the_image_is_the_slow_case():
  same = lambda h, k, stride=1: _params((8, h, h, 16), (k, k, 16, 16), (stride, stride),
                                        ((k // 2, k // 2), (k // 2, k // 2)), (1, 1), (1, 1),
                                        ("NHWC", "HWIO", "NHWC"), 1)
  slow = lambda h, k, stride=1: tap_convolution.is_slow_on_cpu((8, h, h, 16), (k, k, 16, 16), **same(h, k, stride))
  assert slow(2, 3) and slow(1, 3) and slow(4, 7, stride=2)  # 2x2 and 1x1 images, a 7x7 window on a 2x2 output
  assert not slow(3, 3) and not slow(16, 3) and not slow(2, 1) and not slow(32, 7, stride=2)


def test_taps_reading_only_padding_are_skipped():
  # A 3x3 convolution of a 1x1 image reads one tap: the product count falls nine-fold.
  params = _params((4, 1, 1, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC"), 1)
  x, w = np.ones((4, 1, 1, 8), np.float32), np.ones((3, 3, 8, 8), np.float32)
  jaxpr = jax.make_jaxpr(lambda x, w: tap_convolution.tap_sum(x, w, **params))(x, w)
  assert sum(e.primitive.name == "dot_general" for e in jaxpr.jaxpr.eqns) == 1
  np.testing.assert_allclose(tap_convolution.tap_sum(x, w, **params), lax.conv_general_dilated(x, w, **params))


def test_batch_groups_are_refused():
  params = _params((4, 2, 2, 8), (3, 3, 4, 8), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC"), 1)
  with pytest.raises(ValueError, match="batch_group_count"):
    tap_convolution.tap_sum(np.ones((4, 2, 2, 8), np.float32), np.ones((3, 3, 4, 8), np.float32),
                            **{**params, "batch_group_count": 2})
  assert not tap_convolution.is_slow_on_cpu((4, 2, 2, 8), (3, 3, 4, 8), **{**params, "batch_group_count": 2})


def test_evaluate_runs_only_the_slow_convolutions_as_tap_sums():
  if jax.default_backend() != "cpu":
    pytest.skip("the tap sums stand in for XLA:CPU's slow convolutions only")
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fn = lambda v, x: (conv(x, v["small"]), conv(jax.image.resize(x, (2, 6, 6, 4), "nearest"), v["large"]))
  rng = np.random.default_rng(0)
  v = {"small": rng.standard_normal((3, 3, 4, 5)).astype(np.float32),
       "large": rng.standard_normal((3, 3, 4, 5)).astype(np.float32)}
  x = rng.standard_normal((2, 2, 2, 4)).astype(np.float32)
  eqns = jax.make_jaxpr(lambda v, x: trace.evaluate(fn, v, x))(v, x).jaxpr.eqns
  assert sum(e.primitive.name == "conv_general_dilated" for e in eqns) == 1  # the 6x6 image's
  assert sum(e.primitive.name == "dot_general" for e in eqns) == 9  # every tap of the 2x2 image reads data
  for got, expected in zip(jax.jit(lambda v, x: trace.evaluate(fn, v, x))(v, x), fn(v, x)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
