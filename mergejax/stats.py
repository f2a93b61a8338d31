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
compiles once, and its rows are split over all the devices of a mesh by
`jax.shard_map`. Under `jax.distributed` the default mesh holds every
process's devices: each process passes its own batches, the processes agree
on the padded size and on when all are done (`mergejax.distributed`), and
every process gets the statistic of all the data.
"""

import collections
import dataclasses
from collections.abc import Callable, Iterable, Sequence
import functools
import inspect
import time
from typing import Any, NamedTuple
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mergejax import distributed
from mergejax import tree

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


def _unit_batch(x: jax.Array, w: jax.Array, axis_name: str | None):
  """(count, f32[d] means, f32[d] centred sums of squares) of one (sharded) batch's rows x: f32[rows, d]."""
  n = w.sum()
  sums = jnp.einsum("r,rd->d", w, x, precision=HIGHEST)
  if axis_name is not None:
    n, sums = jax.lax.psum((n, sums), axis_name)
  mean = sums / jnp.maximum(n, 1.0)
  squares = jnp.einsum("r,rd->d", w, (x - mean) ** 2, precision=HIGHEST)
  if axis_name is not None:
    squares = jax.lax.psum(squares, axis_name)
  return n, mean, squares


def _merge_units(state, batch):
  """Chan's update of (count, means, sums of squares), unit by unit."""
  (n1, m1, c1), (n2, m2, c2) = state, batch
  n = n1 + n2
  delta = m2 - m1
  mean = m1 + delta * jnp.where(n > 0, n2 / jnp.maximum(n, 1.0), 0.0)
  return n, mean, c1 + c2 + jnp.where(n > 0, n1 * n2 / jnp.maximum(n, 1.0), 0.0) * delta**2


def unit_moments(feature_fn: Callable[[PyTree, Any], Sequence[jax.Array]]) -> Accumulator:
  """Per feature f32[..., d] of `feature_fn(variables, x)` (a list): count, mean and variance of each unit.

  `moments` without the covariance: f32[d] statistics, for passes that need
  each unit alone (REPAIR's rescaling). finalize: `[{"count", "mean", "var"}]`,
  the variance over rows (population: / count).
  """

  return Accumulator(functools.partial(_unit_moments_init, feature_fn), _UnitMomentsUpdate(feature_fn),
                     _unit_moments_finalize)


def _unit_moments_init(feature_fn, variables, x):
  return [(jnp.float32(0), jnp.zeros(s.shape[-1]), jnp.zeros(s.shape[-1]))
          for s in jax.eval_shape(feature_fn, variables, x)]


@dataclasses.dataclass(frozen=True)
class _UnitMomentsUpdate:
  """`unit_moments`' update, a value: equal feature functions make equal updates (one compilation)."""

  feature_fn: Callable[..., Sequence[jax.Array]]

  def __call__(self, state, variables, x, mask, axis_name=None):
    out = []
    for (n1, m1, c1), f in zip(state, self.feature_fn(variables, x)):
      rows, w = _rows(f, mask)
      out.append(_merge_units((n1, m1, c1), _unit_batch(rows, w, axis_name)))
    return out


def _unit_moments_finalize(state):
  return [{"count": n, "mean": m, "var": c / jnp.maximum(n, 1.0)} for n, m, c in state]


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


class ByValue:
  """`fn`, compared and hashed by what it computes rather than by identity.

  A `functools.partial` is its function, arguments and keywords; a bound
  method its function and its object (a Flax module compares by its
  fields); anything else (or a partial with unhashable arguments) is itself.
  Passes whose functions are equal `ByValue`s share a compilation
  (`accumulate` compiles once per `(update, mesh)`), so a second merge of the
  same architecture compiles nothing:

      stats.gram(stats.ByValue(functools.partial(model.apply, train=False)))
  """

  __slots__ = ("fn", "_key", "__weakref__")

  def __init__(self, fn: Callable[..., Any]):
    self.fn = fn.fn if isinstance(fn, ByValue) else fn
    self._key = _value_key(self.fn)

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, ByValue) and self._key == other._key

  def __hash__(self) -> int:
    return hash(self._key)

  def __repr__(self) -> str:
    return f"ByValue({self.fn!r})"


def _value_key(fn: Callable[..., Any]) -> Any:
  """What `ByValue` compares: a hashable description of `fn`, or `fn` itself."""
  try:
    if isinstance(fn, functools.partial):
      key = (functools.partial, _value_key(fn.func), _frozen(fn.args), _frozen(fn.keywords))
    elif inspect.ismethod(fn):
      key = (type(fn), fn.__func__, fn.__self__)
    else:
      return fn
    hash(key)
  except TypeError:  # e.g. array arguments, or keys that do not sort: identity
    return fn
  return key


def _frozen(value: Any) -> Any:
  """Lists, tuples and dicts as hashable tuples (`mutable=["batch_stats"]` equals another such list)."""
  if isinstance(value, dict):
    return (dict, tuple(sorted((k, _frozen(v)) for k, v in value.items())))
  if isinstance(value, (list, tuple)):
    return (type(value), tuple(_frozen(v) for v in value))
  return value


# A feature whose Gram gets fewer rows than this per chunk waits for the whole batch: a rank-32 update of a
# 4608 x 4608 Gram (a ResNet-50's last stage, 8 images a chunk) is bound by memory, not by products.
_STREAMED_ROWS = 512


def gram(feature_fn: Callable[[PyTree, Any], Sequence[jax.Array]], *, chunk: int | None = None) -> Accumulator:
  """Gram matrices Z^T Z of several models' features on the same inputs.

  `variables` is a tuple `(v_1, ..., v_k)`; for each feature of
  `feature_fn(v, x)` (a list of f32[batch, ..., d_i]), the rows of the k
  models' features are concatenated, `z = [f(v_1) | ... | f(v_k)]`, and
  `sum z z^T` accumulates in float32 with `Precision.HIGHEST` (TF32 would
  ruin it). Every block of a least-squares problem over these features is a
  slice of it: `X_a^T X_b` is the `(a, b)` block, and for a linear layer
  `Y_b = X_b W_b`, so `X_a^T Y_b` is that block times `W_b`.

  Only the blocks `X_i^T X_j`, i <= j, are accumulated (3/4 of the products
  for two models); `finalize` assembles the whole matrix. The update is a
  value (`accumulate` compiles it once per
  `(update, mesh)`): a `feature_fn` that compares equal across calls (a
  module-level function, a `ByValue`) shares the compiled pass between
  calls.

  Args:
    feature_fn: `(variables, x) -> [f32[batch, ..., d_i], ...]`, the leading
      axis the examples (so padded rows are masked), the middle ones positions.
    chunk: examples per step: each (device's) batch is split into chunks
      whose features are computed one after another, so a convolution's
      patches exist for one chunk at a time. A feature with fewer than 512
      rows per chunk (few positions: late layers) is kept for the whole batch
      and its Gram taken once after the chunks, a product of the batch's rows
      rather than a memory-bound update per chunk.

  Returns (from `finalize`): a list of Gram, one per feature.
  """
  return Accumulator(functools.partial(_gram_init, feature_fn), _GramUpdate(feature_fn, chunk), _gram_finalize)


def _gram_init(feature_fn, variables, x):
  per_model = [jax.eval_shape(feature_fn, v, x) for v in variables]
  return _zero_blocks(tuple(tuple(f.shape[-1] for f in fs) for fs in zip(*per_model)))


@functools.partial(jax.jit, static_argnums=0)
def _zero_blocks(sizes: tuple[tuple[int, ...], ...]) -> list:
  """Per feature (its sets' widths), a zero count and zero blocks (i, j), i <= j: one program for all."""
  return [(jnp.float32(0), {(i, j): jnp.zeros((d[i], d[j]), jnp.float32) for i, j in _upper(len(d))})
          for d in sizes]


def _gram_finalize(state) -> list[Gram]:
  on_host = all(tree.in_host_memory(b) for _, g in state for b in g.values())
  wholes = [jax.device_put(_whole(np, g)) for _, g in state] if on_host else _whole_grams(state)
  return [Gram(n, whole, tuple(g[(i, i)].shape[0] for i in range(_sets(g)))) for (n, g), whole in zip(state, wholes)]


def _sets(blocks: dict) -> int:
  return max(i for i, _ in blocks) + 1


def _whole(xp, blocks: dict) -> Any:
  """The whole Gram from its blocks (i, j), i <= j, in the array namespace `xp` (NumPy: nothing to compile)."""
  k = _sets(blocks)
  return xp.block([[xp.asarray(blocks[(i, j)]) if i <= j else xp.asarray(blocks[(j, i)]).T for j in range(k)]
                   for i in range(k)])


@jax.jit
def _whole_grams(state) -> list[jax.Array]:
  """`_whole` of every feature on its device: one program for all features."""
  return [_whole(jnp, g) for _, g in state]


def _upper(k: int) -> list[tuple[int, int]]:
  """The blocks (i, j), i <= j, of a k x k block matrix."""
  return [(i, j) for i in range(k) for j in range(i, k)]


def _weighted_rows(fs: Sequence[jax.Array], mask: jax.Array) -> tuple[list[jax.Array], jax.Array]:
  """Each set's rows f32[rows, d] of one feature, and the rows' weights f32[rows] from the mask."""
  rows = [_rows(f, mask) for f in fs]
  return [z for z, _ in rows], rows[0][1]


def _block_sums(rows: Sequence[jax.Array], w: jax.Array) -> tuple[jax.Array, dict]:
  """(sum of the row weights w: f32[rows], {(i, j): (w x_i)^T x_j for i <= j}) of rows x_i: f32[rows, d_i]."""
  weighted = [z * w[:, None] for z in rows]
  return w.sum(), {(i, j): jnp.dot(weighted[i].T, rows[j], precision=HIGHEST) for i, j in _upper(len(rows))}


@dataclasses.dataclass(frozen=True)
class _GramUpdate:
  """`gram`'s update, a value: equal feature functions and chunks make equal updates (one compilation)."""

  feature_fn: Callable[..., Sequence[jax.Array]]
  chunk: int | None

  def __call__(self, state, variables, x, mask, axis_name=None):
    features = lambda x: [list(fs) for fs in zip(*[self.feature_fn(v, x) for v in variables])]
    if self.chunk is None or self.chunk >= x.shape[0]:
      sums = [_block_sums(*_weighted_rows(fs, mask)) for fs in features(x)]
    else:
      sums = _chunked_sums(features, state, x, mask, self.chunk)
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return [(n + dn, jax.tree.map(jnp.add, g, dg)) for (n, g), (dn, dg) in zip(state, sums)]


def _chunked_sums(features, state, x, mask, chunk):
  """`_block_sums` of every feature over a batch taken `chunk` examples at a time (`gram`'s chunk)."""
  steps = -(-x.shape[0] // chunk)
  pad = steps * chunk - x.shape[0]
  x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
  mask = jnp.concatenate([mask, jnp.zeros((pad,), bool)]) if pad else mask
  xs = (x.reshape(steps, chunk, *x.shape[1:]), mask.reshape(steps, chunk))
  shapes = jax.eval_shape(features, jax.ShapeDtypeStruct(xs[0].shape[1:], x.dtype))
  streamed = [chunk * int(np.prod(fs[0].shape[1:-1], dtype=np.int64)) >= _STREAMED_ROWS for fs in shapes]

  def step(acc, c):
    rows = [_weighted_rows(fs, c[1]) for fs in features(c[0])]
    acc = [jax.tree.map(jnp.add, a, _block_sums(*r)) for a, r in zip(acc, [r for r, s in zip(rows, streamed) if s])]
    return acc, [r for r, s in zip(rows, streamed) if not s]  # the others' rows wait for the whole batch

  zero = [(jnp.float32(0), jax.tree.map(jnp.zeros_like, g)) for (_, g), s in zip(state, streamed) if s]
  acc, kept = jax.lax.scan(step, zero, xs)
  acc, kept = iter(acc), iter(kept)
  whole = lambda a: a.reshape(-1, *a.shape[2:])  # [steps, rows, ...] -> [steps * rows, ...]
  out = []
  for s in streamed:
    if s:
      out.append(next(acc))
    else:
      zs, w = next(kept)
      out.append(_block_sums([whole(z) for z in zs], whole(w)))
  return out


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


_EXHAUSTED, _BATCH, _FAILED = 0, 1, 2


def _pull(it: Iterable[Any]) -> tuple[tuple[np.ndarray, ...] | None, Exception | None]:
  """(the next batch or None once exhausted, the error reading it raised)."""
  try:
    return next(it, None), None
  except Exception as e:  # the user's iterator or a batch without labels: the other processes must hear of it
    return None, e


def _signature(arrays: tuple[np.ndarray, ...] | None) -> int:
  """A CRC-32 of the arrays' shapes past the batch axis and dtypes (0 for None)."""
  if arrays is None:
    return 0
  return zlib.crc32(repr([(a.shape[1:], a.dtype.str) for a in arrays]).encode())


def _check_batch(arrays: tuple[np.ndarray, ...], first: tuple[np.ndarray, ...], count: int,
                 labels: bool) -> ValueError | None:
  """The error of a batch that does not fit the first batch of its process, else None."""
  x = arrays[0]
  if x.shape[1:] != first[0].shape[1:] or x.shape[0] > first[0].shape[0]:
    return ValueError(
        f"accumulate: batch {count} has shape {x.shape}; batches must be at most the first's"
        f" {first[0].shape}, with the same input shape")
  if labels and (arrays[1].shape[0] != x.shape[0] or arrays[1].shape[1:] != first[1].shape[1:]):
    return ValueError(
        f"accumulate: batch {count} has inputs {x.shape} and labels {arrays[1].shape}; each"
        f" input needs a label of the first batch's label shape {first[1].shape[1:]}")
  return None


def _raise_failures(table: np.ndarray, error: Exception | None, count: int) -> None:
  """Raises this process's error, or a ValueError naming the processes that failed."""
  if error is not None:
    raise error
  failed = np.flatnonzero(table[:, 0] == _FAILED)
  if failed.size:
    raise ValueError(
        f"accumulate: process(es) {failed.tolist()} failed to read or check their batch at step {count}"
        " (see their logs)")


def accumulate(
    stat: Accumulator,
    variables: PyTree,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> Any:
  """One pass of `stat` over `batches`, each batch split over the devices of `mesh`.

  With several processes (`jax.distributed`) each passes its own batches
  (its shard of the data) and the same `variables`; over a mesh holding
  devices of every process (the default) the result is the statistic of all
  the processes' data, the same on every process. Step k updates with the k-th
  batch of every process, assembled into one global batch
  (`jax.make_array_from_process_local_data`, process by process in device
  order); a process whose batches ran out (or that has none) passes a fully
  masked one until every process's have (DESIGN.md, Statistics over several
  processes).

  Args:
    stat: an Accumulator.
    variables: passed to every update (replicated over the mesh); the same on
      every process.
    batches: inputs, or tuples whose first element is the input (and second
      the labels, where `stat.labels`), or a callable returning a fresh
      iterable (DESIGN.md, batches).
    mesh: the devices each batch's rows are split over, along all the mesh's
      axes at once (a user's `("data", "model")` mesh works as it is; the
      variables are replicated over it). Default: a 1-D mesh named "data" over
      every device of every process. A mesh of this process's devices only
      gives this process's statistic.
    progress: log batches/s at most every 10 s.

  Returns:
    `stat.finalize` of the accumulated state, on the first local device.

  Raises:
    ValueError: for no batches (on every process of a global mesh; a
      process with none passes masked batches), a batch larger than its
      process's first or of another input shape, first batches of different
      input shapes or dtypes on different processes, variables that differ
      between processes, or (where `stat.labels`) a batch without labels or
      with labels of another shape; a process's failure raises on every
      process of the mesh (never a hang), and so does a mesh that spans some
      processes but not all.
  """
  mesh = distributed.default_mesh() if mesh is None else mesh
  global_pass = distributed.is_global(mesh)
  me = jax.process_index()
  devices_of = collections.Counter(d.process_index for d in mesh.devices.flat)
  it = iter(_examples(batches, stat.labels))
  first, error = _pull(it)
  if first is not None:
    error = _check_batch(first, first, 0, stat.labels)
  status = _FAILED if error is not None else _EXHAUSTED if first is None else _BATCH
  table = distributed.gather_ints(mesh, [
      status, 0 if first is None else first[0].shape[0], _signature(first),
      distributed.fingerprint(variables) if global_pass else 0])
  _raise_failures(table, error, 0)
  processes = sorted(devices_of) if global_pass else [me]
  _check_first_batches(table, processes, first)

  def arg(arrays):  # what init and update take as x
    return arrays if stat.labels else arrays[0]

  per_device = max(-(-int(rows) // devices_of[p]) for p, rows in zip(processes, table[:, 1]))
  size, global_size = per_device * devices_of[me], per_device * mesh.devices.size
  arrays = first
  if global_pass and (table[:, 0] == _EXHAUSTED).any():  # a process with no batch: masked batches only
    first = distributed.shared_example(mesh, first, rows=size)
  axes = tuple(mesh.axis_names)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes[0] if len(axes) == 1 else axes))

  def global_batch(local):
    return jax.make_array_from_process_local_data(rows, local, (global_size, *local.shape[1:]))

  update = _sharded_update(stat.update, mesh)
  state = distributed.replicate(stat.init(variables, arg(first)), mesh)
  variables = distributed.replicate(variables, mesh)  # also when committed to one device
  blank = tuple(np.zeros((size, *a.shape[1:]), a.dtype) for a in first)
  count = 0
  start = last_log = time.perf_counter()
  while True:
    if arrays is None:
      local, real = blank, 0
    else:
      local, real = tuple(_padded(a, size) for a in arrays), arrays[0].shape[0]
    xs = tuple(global_batch(a) for a in local)
    state = update(state, variables, arg(xs), global_batch(np.arange(size) < real))
    count += 1
    if progress and time.perf_counter() - last_log > 10:
      jax.block_until_ready(state)
      last_log = time.perf_counter()
      logging.info("accumulate: %d batches, %.1f batches/s", count, count / (last_log - start))
    if arrays is not None:
      arrays, error = _pull(it)
      if arrays is not None:
        error = _check_batch(arrays, first, count, stat.labels)
    status = _FAILED if error is not None else _EXHAUSTED if arrays is None else _BATCH
    table = distributed.gather_ints(mesh, [status])
    _raise_failures(table, error, count)
    if (table[:, 0] == _EXHAUSTED).all():
      return stat.finalize(distributed.local_copy(state))


def _check_first_batches(table: np.ndarray, processes: list[int], first: tuple[np.ndarray, ...] | None) -> None:
  """Every process has a first batch, of one input shape and dtype, and the same variables.

  `table` holds each process's `(status, rows, signature, fingerprint)`.
  """
  if len(processes) == 1:
    if first is None:
      raise ValueError("accumulate: batches is empty")
    return
  if (table[:, 0] == _EXHAUSTED).all():
    raise ValueError(f"accumulate: batches is empty on every process ({processes})")
  mine = "" if first is None else f" (process {jax.process_index()}'s: {[(a.shape, a.dtype.name) for a in first]})"
  if len(set(table[table[:, 0] != _EXHAUSTED, 2])) > 1:  # a process with no batch has no shapes
    raise ValueError(
        "accumulate: the processes' first batches differ in shape past the batch axis or dtype"
        f"{mine}; every process's batches must have the same input (and label) shape and dtype")
  if len(set(table[:, 3])) > 1:
    differ = [p for p, f in zip(processes, table[:, 3]) if f != table[0, 3]]
    raise ValueError(
        f"accumulate: the variables differ between processes (process(es) {differ} from process"
        f" {processes[0]}); every process must pass the same variables")


@functools.lru_cache(maxsize=64)
def _sharded_update(update: Callable[..., Any], mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """`update` jitted and sharded over all the mesh's axes, made once per (update, mesh).

  So passes of one accumulator's update (the Fishers of several models, say)
  share a compilation.
  """
  axes = tuple(mesh.axis_names)
  axis = axes[0] if len(axes) == 1 else axes
  spec = jax.sharding.PartitionSpec
  return jax.jit(jax.shard_map(
      functools.partial(update, axis_name=axis), mesh=mesh,
      in_specs=(spec(), spec(), spec(axis), spec(axis)), out_specs=spec(), check_vma=False))
