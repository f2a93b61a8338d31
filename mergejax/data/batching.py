"""A deterministic, seeded iterator of global batches.

    for xb, yb in batches(x, y, batch_size=128, seed=0, epochs=2):
      ...

Batches are *global*: a caller shards them over devices. The last, partial
batch of an epoch is yielded unless `drop_remainder=True`, so no example is
lost; downstream code pads ragged batches. Where several passes are needed (a
callable returning a fresh iterator, as DESIGN.md's `batches` contract allows),
bind the arguments:

    fresh = functools.partial(batches, x, y, batch_size=128)
    first_pass, second_pass = fresh(), fresh()   # the same batches, in order
"""

from collections.abc import Iterator
import itertools

import numpy as np


def batches(
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    epochs: int | None = 1,
    drop_remainder: bool = False,
) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
  """Yields batches of `(x, y)` (or of `x` alone), epoch after epoch.

  Args:
    x: [n, ...], inputs (anything `np.asarray` takes, e.g. a host jax array).
    y: [n, ...] or None, labels or targets.
    batch_size: examples per batch, >= 1.
    seed: a non-negative int; epoch `e` is shuffled by
      `np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(e,)))`,
      so each epoch has its own order and any epoch can be reproduced alone.
    shuffle: if False, examples come in their order in `x`, every epoch.
    epochs: passes over the data, >= 1, or None to repeat forever.
    drop_remainder: if True, leave out the last batch of an epoch when it is
      smaller than `batch_size`.

  Yields:
    `(x[idx], y[idx])` with `idx: int[batch_size]` (fewer for an epoch's last
    batch), or `x[idx]` alone if `y` is None; copies, not views.

  Raises:
    ValueError: (at the call, not at the first batch) if x and y differ in
      length, x is empty, batch_size < 1, epochs < 1, the seed is negative, or
      `drop_remainder` would leave no batch at all.
  """
  x = np.asarray(x)
  y = None if y is None else np.asarray(y)
  if x.ndim < 1 or len(x) == 0:
    raise ValueError(f"batches: x must hold at least one example, got shape {x.shape}")
  if y is not None and (y.ndim < 1 or len(y) != len(x)):
    raise ValueError(f"batches: x and y must have the same length, got {x.shape} and {y.shape}")
  if batch_size < 1:
    raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
  if epochs is not None and epochs < 1:
    raise ValueError(f"batches: epochs must be >= 1 or None, got {epochs}")
  if drop_remainder and batch_size > len(x):
    raise ValueError(
        f"batches: batch_size {batch_size} > {len(x)} examples with drop_remainder leaves no batch"
    )
  np.random.SeedSequence(seed)  # A negative or non-integer seed fails here, not later.
  return _stream(x, y, batch_size, seed, shuffle, epochs, drop_remainder)


def _stream(
    x: np.ndarray,
    y: np.ndarray | None,
    batch_size: int,
    seed: int,
    shuffle: bool,
    epochs: int | None,
    drop_remainder: bool,
) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
  """The generator behind `batches`, its arguments checked."""
  n = len(x)
  stop = n - n % batch_size if drop_remainder else n
  for epoch in itertools.count() if epochs is None else range(epochs):
    order = _order(n, seed, epoch) if shuffle else np.arange(n)
    for start in range(0, stop, batch_size):
      idx = order[start:start + batch_size]
      yield x[idx] if y is None else (x[idx], y[idx])


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
  """int[n]: a permutation of `range(n)`, from the stream of `(seed, epoch)`."""
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,))).permutation(n)
