"""Fixed input transforms that make a shifted domain of a dataset.

    ds2 = shift(ds, "blur", sigma=1.0)

A transform acts on every example alike and, given its seed, is
deterministic. It works over the *spatial* axes: `(h, w)` of images
`f32[n, h, w, c]`, the steps of sequences `f32[n, length]` (and, for `noise`,
any input). Transforms:

- `"identity"`: the inputs, unchanged.
- `"noise"`: additive Gaussian noise, N(0, std^2) per value.
- `"blur"`: a Gaussian blur of width `sigma` over the spatial axes (edges
  reflected, so an image's mean is kept).
- `"shift"`: a translation by `pixels` along every spatial axis (or one count
  per axis), towards higher indices for positive counts, filling with zeros.

Inputs are not clipped afterwards: noise can take values out of the original
range.
"""

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any, TypeVar

import numpy as np
from scipy import ndimage

from mergejax.data import dispatch
from mergejax.data.dataset import Dataset

D = TypeVar("D", bound=Dataset)
Seed = int | np.random.SeedSequence


def identity(x: np.ndarray) -> np.ndarray:
  """The inputs, unchanged."""
  return x


def noise(x: np.ndarray, *, rng: np.random.Generator, std: float = 0.1) -> np.ndarray:
  """`x` plus Gaussian noise of standard deviation `std` (>= 0)."""
  if std < 0:
    raise ValueError(f"noise: std must be >= 0, got {std}")
  return x + np.float32(std) * rng.standard_normal(x.shape, dtype=np.float32)


def blur(x: np.ndarray, *, sigma: float = 1.0) -> np.ndarray:
  """A Gaussian blur of width `sigma` (> 0, in pixels or steps) per example."""
  if sigma <= 0:
    raise ValueError(f"blur: sigma must be > 0, got {sigma}")
  axes = spatial_axes(x)
  return ndimage.gaussian_filter(
      x, [sigma if a in axes else 0.0 for a in range(x.ndim)], mode="reflect"
  )


def translate(x: np.ndarray, *, pixels: int | Sequence[int] = 1) -> np.ndarray:
  """Each example moved by `pixels` along its spatial axes, zero-filled.

  Args:
    x: f32[n, h, w, c] or f32[n, length].
    pixels: one count for every spatial axis, or one per axis (`(dy, dx)`);
      positive counts move content towards higher indices (down, right).

  Returns:
    `x`'s shape: `out[:, i + dy, j + dx] = x[:, i, j]` where both are in range,
    0 elsewhere.
  """
  axes = spatial_axes(x)
  counts = (pixels,) * len(axes) if np.ndim(pixels) == 0 else tuple(pixels)
  if len(counts) != len(axes) or not all(isinstance(k, (int, np.integer)) for k in counts):
    raise ValueError(f"shift: pixels must be an int or {len(axes)} ints, got {pixels!r}")
  for axis, k in zip(axes, counts):
    x = _translate_axis(x, int(k), axis)
  return x


TRANSFORMS = {"identity": identity, "noise": noise, "blur": blur, "shift": translate}


def transform_fn(
    name: str, *, seed: Seed = 0, **options: Any
) -> Callable[[np.ndarray], np.ndarray]:
  """The transform `name` as a function of the inputs, its options checked.

  Args:
    name: one of `"identity"`, `"noise"`, `"blur"`, `"shift"`.
    seed: seeds the transform's randomness (noise), drawn in call order;
      anything `np.random.default_rng` takes.
    **options: the transform's options: `std` (noise), `sigma` (blur),
      `pixels` (shift).

  Returns:
    `f32[n, *shape] -> f32[n, *shape]`.

  Raises:
    ValueError: for an unknown name or option.
  """
  return dispatch.bind(
      TRANSFORMS, "transform", name, {"rng": np.random.default_rng(seed)}, options
  )


def shift(ds: D, transform: str, *, seed: Seed = 0, **options: Any) -> D:
  """`ds` with one fixed transform applied to its train and test inputs alike.

  Args:
    ds: a `Dataset` (or a `Task`, which stays a `Task`).
    transform: `"identity"`, `"noise"`, `"blur"` or `"shift"` (translate).
    seed: seeds the transform's randomness: the train inputs draw first, then
      the test inputs.
    **options: the transform's options: `std=0.1` (noise), `sigma=1.0` (blur),
      `pixels=1` (shift).

  Returns:
    A copy named `f"{ds.name}+{transform}"`, labels unchanged.

  Raises:
    ValueError: for an unknown transform or option, an invalid option value,
      or inputs without spatial axes where the transform needs them.
  """
  fn = transform_fn(transform, seed=seed, **options)
  return dataclasses.replace(
      ds, name=f"{ds.name}+{transform}", x_train=fn(ds.x_train), x_test=fn(ds.x_test)
  )


def spatial_axes(x: np.ndarray) -> tuple[int, ...]:
  """`(1, 2)` for images `[n, h, w, c]`, `(1,)` for sequences `[n, length]`."""
  if x.ndim == 4:
    return (1, 2)
  if x.ndim == 2:
    return (1,)
  raise ValueError(
      "a spatial transform needs images [n, h, w, c] or sequences [n, length],"
      f" got shape {x.shape}"
  )


def _translate_axis(x: np.ndarray, k: int, axis: int) -> np.ndarray:
  """`x` moved by `k` along `axis` (towards higher indices if k > 0), zero-filled."""
  out = np.zeros_like(x)
  size = x.shape[axis]
  if abs(k) < size:
    src = [slice(None)] * x.ndim
    dst = [slice(None)] * x.ndim
    src[axis] = slice(max(-k, 0), size - max(k, 0))
    dst[axis] = slice(max(k, 0), size - max(-k, 0))
    out[tuple(dst)] = x[tuple(src)]
  return out
