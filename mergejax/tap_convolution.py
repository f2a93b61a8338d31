"""Convolutions whose window exceeds their output, computed as sums over taps.

    if tap_convolution.is_slow_on_cpu(lhs.shape, rhs.shape, **params):
      out = tap_convolution.tap_sum(lhs, rhs, **params)

XLA:CPU computes a `conv_general_dilated` whose output is smaller than its
window in a spatial dimension (a 3x3 convolution of a 2x2 image: the last
stage of a ResNet-50 on 64x64 inputs) by a generic loop that reaches
0.3 GFLOP/s where its other convolutions reach 20-40 (a 2-core CPU, 32 images,
512 channels: 1.9 s against 25 ms as a sum of shifted products; a merged
model's 1024 channels, 12.7 s). The same convolution written as one matrix
product per window tap (`x[strided slice] @ w[tap]`, summed) runs at the
matrix-product rate, and taps that read only padding are skipped (at 2x2, 4
of a 3x3 window's 9 taps read nothing but zeros for a quarter of the
outputs; at 1x1, 8 of 9 read only zeros). mergejax's own passes over data
(`trace.evaluate`: the Gram pass, the batch-norm reset) use it on CPU; other
backends bind the convolution as it is.
"""

from collections.abc import Sequence
import itertools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


def is_slow_on_cpu(lhs_shape: Sequence[int], rhs_shape: Sequence[int], *, window_strides, padding, lhs_dilation,
                   rhs_dilation, dimension_numbers, batch_group_count, out_sharding=None, **_) -> bool:
  """Whether XLA:CPU would take its slow path: a window larger than the output in a spatial dimension.

  Only for `batch_group_count == 1` and no `out_sharding` (what `tap_sum`
  computes); called with a `conv_general_dilated` equation's params.
  """
  if batch_group_count != 1 or out_sharding is not None:
    return False
  dn = dimension_numbers
  outputs = _output_sizes(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation, rhs_dilation, dn)
  windows = [rhs_shape[d] for d in dn.rhs_spec[2:]]
  return any(k > 1 and (k - 1) * r + 1 > o for k, r, o in zip(windows, rhs_dilation, outputs))


def _output_sizes(lhs_shape, rhs_shape, strides, padding, lhs_dilation, rhs_dilation, dn) -> list[int]:
  """The output's spatial sizes, in the order of the spec's spatial dimensions."""
  sizes = []
  for i, (s, (lo, hi), ld, rd) in enumerate(zip(strides, padding, lhs_dilation, rhs_dilation)):
    n, k = lhs_shape[dn.lhs_spec[2 + i]], rhs_shape[dn.rhs_spec[2 + i]]
    padded = (n - 1) * ld + 1 + lo + hi
    sizes.append(max(0, (padded - ((k - 1) * rd + 1)) // s + 1))
  return sizes


def tap_sum(lhs: jax.Array, rhs: jax.Array, *, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, batch_group_count, precision=None,
            preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`lax.conv_general_dilated(lhs, rhs, ...)` as one product per window tap, summed.

  Takes a `conv_general_dilated` equation's params (`dimension_numbers` a
  `ConvDimensionNumbers`). Tap `t` reads the strided slice of the padded
  (and dilated) input that its window position sees for every output,
  `x_t: [batch, in, out_spatial...]`, and contributes `x_t` contracted with
  `rhs[..., t]: [out, in / groups]` per feature group. A tap whose slice lies
  wholly in the padding contributes nothing and is skipped.

  Raises:
    ValueError: for `batch_group_count != 1` or an `out_sharding`.
  """
  if batch_group_count != 1 or out_sharding is not None:
    raise ValueError(f"tap_sum: batch_group_count must be 1 and out_sharding None, got {batch_group_count}"
                     f" and {out_sharding}")
  dn = dimension_numbers
  x = jnp.transpose(lhs, dn.lhs_spec)  # [batch, in, spatial...]
  w = jnp.transpose(rhs, dn.rhs_spec)  # [out, in / groups, window...]
  outputs = _output_sizes(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation, dn)
  spatial = len(outputs)
  x = lax.pad(x, jnp.zeros((), x.dtype),
              [(0, 0, 0), (0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation)])
  data = [_data_positions(lhs.shape[dn.lhs_spec[2 + i]], padding[i][0], lhs_dilation[i]) for i in range(spatial)]
  groups, out_features = feature_group_count, w.shape[0]
  batch, in_features = x.shape[:2]
  total = None
  for tap in itertools.product(*[range(k) for k in w.shape[2:]]):
    starts = [t * r for t, r in zip(tap, rhs_dilation)]
    if not all(_reads_data(start, o, s, d) for start, o, s, d in zip(starts, outputs, window_strides, data)):
      continue
    xt = lax.slice(x, (0, 0, *starts), (batch, in_features, *[st + (o - 1) * s + 1 for st, o, s in
                                                              zip(starts, outputs, window_strides)]),
                   (1, 1, *window_strides))  # [batch, in, out_spatial...]
    xt = xt.reshape(batch, groups, in_features // groups, *outputs)
    wt = w[(slice(None), slice(None), *tap)].reshape(groups, out_features // groups, -1)  # [groups, out/g, in/g]
    term = lax.dot_general(xt, wt, (((2,), (2,)), ((1,), (0,))), precision=precision,
                           preferred_element_type=preferred_element_type)  # [groups, batch, spatial..., out/g]
    total = term if total is None else total + term
  if total is None:  # every tap reads padding only
    total = jnp.zeros((groups, batch, *outputs, out_features // groups), preferred_element_type or x.dtype)
  out = jnp.moveaxis(total, 0, -2).reshape(batch, *outputs, out_features)  # [batch, spatial..., out]
  canonical = (0, 1 + spatial, *range(1, 1 + spatial))  # -> [batch, out, spatial...]
  return jnp.transpose(jnp.transpose(out, canonical), np.argsort(dn.out_spec))


def _data_positions(size: int, low: int, dilation: int) -> np.ndarray:
  """Indices of the padded, dilated input that hold data (not padding or dilation holes)."""
  return low + dilation * np.arange(size)


def _reads_data(start: int, outputs: int, stride: int, data: np.ndarray) -> bool:
  """Whether positions start, start + stride, ... (outputs of them) include a data position."""
  offsets = data - start
  return bool(np.any((offsets >= 0) & (offsets % stride == 0) & (offsets // stride < outputs)))
