"""Streaming statistics over data, merged across batches and devices.

    stat = cross_moments(features)          # features(variables, x) -> [f32[..., d], ...]
    result = accumulate(stat, (va, vb), batches)

An accumulator is `Accumulator(init, update, finalize)`, the shape of an optax
transformation: `init(variables, x) -> state` (x for shapes only),
`update(state, variables, x, mask, axis_name=None) -> state` and
`finalize(state) -> result`, all pure and jittable. `mask: bool[batch]` marks
the real rows of a padded batch; with `axis_name`, `update` merges the
batch's contribution over that mapped axis with `psum`, so it also composes
with a user's own `shard_map` or `pmap`. An accumulator built with
`labels=True` (the empirical Fisher) reads labels: `init` and `update` then
take the pair `(x, y)` where the others take `x`.

Moments merge by Chan's parallel update of (count, mean, co-moment), between
batches and between devices, never as E[xy] - E[x]E[y] (which cancels
catastrophically for features far from zero).

`accumulate` runs one pass: every batch is padded to the first batch's size
(rounded up to a multiple of the device count) and masked, so the update
compiles once, and is split over the devices of a 1-D mesh by
`jax.shard_map`.
"""

from collections.abc import Callable, Iterable, Sequence
import functools
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST


class Accumulator(NamedTuple):
  """A streaming statistic (see the module docstring).

  Attributes:
    init: `(variables, x) -> state`.
    update: `(state, variables, x, mask, axis_name=None) -> state`.
    finalize: `state -> result`.
    labels: if True, `x` is the pair `(x, y)` of a batch's inputs and labels,
      and `accumulate` refuses batches without labels.
  """

  init: Callable[..., PyTree]
  update: Callable[..., PyTree]
  finalize: Callable[[PyTree], Any]
  labels: bool = False


class CrossMoments(NamedTuple):
  """Moments of paired features a: f32[d_a], b: f32[d_b] (population: / count).

  Attributes:
    count: the number of feature rows (examples times positions).
    mean_a, mean_b: f32[d_a], f32[d_b].
    cov_aa, cov_bb, cov_ab: f32[d_a, d_a], f32[d_b, d_b], f32[d_a, d_b].
    correlation: f32[d_a, d_b], cov_ab / outer(std_a, std_b), with 1e-12
      added to each variance.
  """

  count: jax.Array
  mean_a: jax.Array
  mean_b: jax.Array
  cov_aa: jax.Array
  cov_bb: jax.Array
  cov_ab: jax.Array
  correlation: jax.Array


def _rows(f: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """f32[batch, ..., d] -> (f32[rows, d], f32[rows] weights from the mask)."""
  f = jnp.asarray(f, jnp.float32)
  per_example = int(np.prod(f.shape[1:-1], dtype=np.int64))
  w = jnp.repeat(mask.astype(jnp.float32), per_example)
  return f.reshape(-1, f.shape[-1]), w


def _batch_moments(xs: Sequence[jax.Array], w: jax.Array, axis_name: str | None):
  """(count, means, co-moments of every pair i <= j) of one (sharded) batch."""
  n = w.sum()
  sums = [jnp.einsum("r,rd->d", w, x, precision=HIGHEST) for x in xs]
  if axis_name is not None:
    n, sums = jax.lax.psum((n, sums), axis_name)
  safe = jnp.maximum(n, 1.0)
  means = [s / safe for s in sums]
  centred = [x - m for x, m in zip(xs, means)]
  co = {(i, j): jnp.einsum("r,rd,re->de", w, centred[i], centred[j], precision=HIGHEST)
        for i in range(len(xs)) for j in range(i, len(xs))}
  if axis_name is not None:
    co = jax.lax.psum(co, axis_name)
  return n, means, co


def _merge(state, batch):
  """Chan's update of (count, means, co-moments) by a batch's."""
  n1, m1, c1 = state
  n2, m2, c2 = batch
  n = n1 + n2
  frac = jnp.where(n > 0, n2 / jnp.maximum(n, 1.0), 0.0)
  deltas = [b - a for a, b in zip(m1, m2)]
  means = [a + d * frac for a, d in zip(m1, deltas)]
  weight = jnp.where(n > 0, n1 * n2 / jnp.maximum(n, 1.0), 0.0)
  co = {k: c1[k] + c2[k] + weight * jnp.outer(deltas[k[0]], deltas[k[1]]) for k in c1}
  return n, means, co


def _paired(xs_fn: Callable[..., list], num: int) -> Accumulator:
  """Moments of `num` feature sets per leaf, from xs_fn(variables, x) -> leaves of lists."""

  def init(variables, x):
    shapes = jax.eval_shape(xs_fn, variables, x)
    return [(jnp.float32(0), [jnp.zeros(s.shape[-1]) for s in leaf],
             {(i, j): jnp.zeros((leaf[i].shape[-1], leaf[j].shape[-1]))
              for i in range(num) for j in range(i, num)})
            for leaf in shapes]

  def update(state, variables, x, mask, axis_name=None):
    out = []
    for s, leaf in zip(state, xs_fn(variables, x)):
      rows = [_rows(f, mask) for f in leaf]
      out.append(_merge(s, _batch_moments([r for r, _ in rows], rows[0][1], axis_name)))
    return out

  return init, update


def moments(feature_fn: Callable[[PyTree, Any], Sequence[jax.Array]]) -> Accumulator:
  """Per feature f32[..., d] of `feature_fn(variables, x)` (a list): count, mean, covariance."""

  def xs_fn(variables, x):
    return [[f] for f in feature_fn(variables, x)]

  init, update = _paired(xs_fn, 1)

  def finalize(state):
    return [{"count": n, "mean": m[0], "cov": c[(0, 0)] / jnp.maximum(n, 1.0)} for n, m, c in state]

  return Accumulator(init, update, finalize)


def cross_moments(feature_fn: Callable[[PyTree, Any], Sequence[jax.Array]]) -> Accumulator:
  """Moments of two models' features on the same inputs; variables is `(va, vb)`.

  Returns (from `finalize`) a list of CrossMoments, one per feature of
  `feature_fn(variables, x)` (a list of f32[..., d]).
  """

  def xs_fn(pair, x):
    va, vb = pair
    return [[a, b] for a, b in zip(feature_fn(va, x), feature_fn(vb, x))]

  init, update = _paired(xs_fn, 2)

  def finalize(state):
    out = []
    for n, (ma, mb), c in state:
      n_ = jnp.maximum(n, 1.0)
      aa, bb, ab = c[(0, 0)] / n_, c[(1, 1)] / n_, c[(0, 1)] / n_
      std_a, std_b = jnp.sqrt(jnp.diag(aa) + 1e-12), jnp.sqrt(jnp.diag(bb) + 1e-12)
      out.append(CrossMoments(n, ma, mb, aa, bb, ab, ab / jnp.outer(std_a, std_b)))
    return out

  return Accumulator(init, update, finalize)


class Gram(NamedTuple):
  """The uncentred Gram matrix of concatenated features.

  Attributes:
    count: the number of feature rows (examples times positions).
    gram: f32[d, d], the sum over rows of z z^T, z = concat(features of each
      variable set) (so `gram / count` is the second moment).
    sizes: each variable set's feature width, in concatenation order (static).
  """

  count: jax.Array
  gram: jax.Array
  sizes: tuple[int, ...]


def gram(feature_fn: Callable[[PyTree, Any], Sequence[jax.Array]], *, chunk: int | None = None) -> Accumulator:
  """Gram matrices Z^T Z of several models' features on the same inputs.

  `variables` is a tuple `(v_1, ..., v_k)`; for each feature of
  `feature_fn(v, x)` (a list of f32[batch, ..., d_i]), the rows of the k
  models' features are concatenated, `z = [f(v_1) | ... | f(v_k)]`, and
  `sum z z^T` accumulates in float32 with `Precision.HIGHEST` (TF32 would
  ruin it). Every block of a least-squares problem over these features is a
  slice of it: `X_a^T X_b` is the `(a, b)` block, and for a linear layer
  `Y_b = X_b W_b`, so `X_a^T Y_b` is that block times `W_b`.

  Args:
    feature_fn: `(variables, x) -> [f32[batch, ..., d_i], ...]`, the leading
      axis the examples (so padded rows are masked), the middle ones positions.
    chunk: examples per step: each (device's) batch is split into chunks
      whose features are computed and accumulated one after another, so a
      convolution's patches exist for one chunk at a time.

  Returns (from `finalize`): a list of Gram, one per feature.
  """

  def concatenated(variables, x):
    per_model = [feature_fn(v, x) for v in variables]
    return [jnp.concatenate([jnp.asarray(f, jnp.float32) for f in fs], axis=-1) for fs in zip(*per_model)]

  sizes = []  # each feature's per-model widths, known once `init` has seen the shapes

  def init(variables, x):
    per_model = [jax.eval_shape(feature_fn, v, x) for v in variables]
    sizes[:] = [tuple(f.shape[-1] for f in fs) for fs in zip(*per_model)]
    return [(jnp.float32(0), jnp.zeros((sum(d),) * 2, jnp.float32)) for d in sizes]

  def chunk_sums(variables, x, mask):
    sums = []
    for z in concatenated(variables, x):
      z, w = _rows(z, mask)
      sums.append((w.sum(), jnp.einsum("r,rd,re->de", w, z, z, precision=HIGHEST)))
    return sums

  def update(state, variables, x, mask, axis_name=None):
    size = x.shape[0]
    if chunk is None or chunk >= size:
      sums = chunk_sums(variables, x, mask)
    else:
      steps = -(-size // chunk)
      pad = steps * chunk - size
      x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
      mask = jnp.concatenate([mask, jnp.zeros((pad,), bool)]) if pad else mask
      xs = (x.reshape(steps, chunk, *x.shape[1:]), mask.reshape(steps, chunk))
      zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(chunk_sums, variables, xs[0][0], xs[1][0]))
      sums, _ = jax.lax.scan(
          lambda acc, c: (jax.tree.map(jnp.add, acc, chunk_sums(variables, *c)), None), zero, xs)
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return [(n + dn, g + dg) for (n, g), (dn, dg) in zip(state, sums)]

  def finalize(state):
    return [Gram(n, g, d) for (n, g), d in zip(state, sizes)]

  return Accumulator(init, update, finalize)


def _examples(batches, labels: bool) -> Iterable[tuple[np.ndarray, ...]]:
  """Each batch as `(x,)`, or as `(x, y)` where the statistic reads labels."""
  for i, batch in enumerate(batches() if callable(batches) else batches):
    pair = isinstance(batch, (tuple, list))
    if not labels:
      yield (np.asarray(batch[0] if pair else batch),)
    elif pair and len(batch) >= 2:
      yield np.asarray(batch[0]), np.asarray(batch[1])
    else:
      raise ValueError(
          f"accumulate: the statistic reads labels, so batches must be (x, y) pairs; batch {i}"
          f" is a {type(batch).__name__}")


def _padded(a: np.ndarray, size: int) -> np.ndarray:
  """`a` with zero rows appended up to `size` rows."""
  pad = size - a.shape[0]
  return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a


def accumulate(
    stat: Accumulator,
    variables: PyTree,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> Any:
  """One pass of `stat` over `batches`, sharded over the devices of `mesh`.

  Args:
    stat: an Accumulator.
    variables: passed to every update (replicated).
    batches: inputs, or tuples whose first element is the input (and second
      the labels, where `stat.labels`), or a callable returning a fresh
      iterable (DESIGN.md, batches).
    mesh: a 1-D mesh whose axis is named "data"; default all local devices.
    progress: log batches/s at most every 10 s.

  Returns:
    `stat.finalize` of the accumulated state, on the first local device.

  Raises:
    ValueError: for no batches, a batch larger than the first or of another
      input shape, or (where `stat.labels`) a batch without labels or with
      labels of another shape.
  """
  if mesh is None:
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
  devices = mesh.devices.size
  spec = jax.sharding.PartitionSpec
  it = iter(_examples(batches, stat.labels))
  first = next(it, None)
  if first is None:
    raise ValueError("accumulate: batches is empty")
  size = -(-first[0].shape[0] // devices) * devices

  def arg(arrays):  # what init and update take as x
    return arrays if stat.labels else arrays[0]

  update = _sharded_update(stat.update, mesh)
  replicated = jax.sharding.NamedSharding(mesh, spec())
  variables = jax.device_put(variables, replicated)  # also when committed to one device
  state = jax.device_put(stat.init(variables, arg(first)), replicated)
  start, last_log, count = time.perf_counter(), time.perf_counter(), 0
  for arrays in _chain(first, it):
    x = arrays[0]
    if x.shape[1:] != first[0].shape[1:] or x.shape[0] > first[0].shape[0]:
      raise ValueError(
          f"accumulate: batch {count} has shape {x.shape}; batches must be at most the first's"
          f" {first[0].shape}, with the same input shape")
    if stat.labels and (arrays[1].shape[0] != x.shape[0] or arrays[1].shape[1:] != first[1].shape[1:]):
      raise ValueError(
          f"accumulate: batch {count} has inputs {x.shape} and labels {arrays[1].shape}; each"
          f" input needs a label of the first batch's label shape {first[1].shape[1:]}")
    mask = np.arange(size) < x.shape[0]
    state = update(state, variables, arg(tuple(_padded(a, size) for a in arrays)), mask)
    count += 1
    if progress and time.perf_counter() - last_log > 10:
      jax.block_until_ready(state)
      last_log = time.perf_counter()
      logging.info("accumulate: %d batches, %.1f batches/s", count, count / (last_log - start))
  return stat.finalize(jax.device_put(state, jax.local_devices()[0]))


@functools.lru_cache(maxsize=64)
def _sharded_update(update: Callable[..., Any], mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """`update` jitted and sharded over the mesh's axis, made once per (update, mesh).

  So passes of one accumulator's update (the Fishers of several models, say)
  share a compilation.
  """
  (axis,) = mesh.axis_names
  spec = jax.sharding.PartitionSpec
  return jax.jit(jax.shard_map(
      functools.partial(update, axis_name=axis), mesh=mesh,
      in_specs=(spec(), spec(), spec(axis), spec(axis)), out_specs=spec(), check_vma=False))


def _chain(first, rest):
  yield first
  yield from rest
