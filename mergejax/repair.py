"""Repairing merged models' statistics: batch-norm reset and REPAIR.

An average of two aligned networks has units whose statistics collapse
(variance shrinks); Jordan et al. 2023 ("REPAIR") restore them.

    merged = mj.repair.reset_batch_norm(train_apply, merged, batches)
    merged = mj.repair.repair(spec, model.apply, va, vb_aligned, merged, batches)

`reset_batch_norm` recomputes BatchNorm running statistics as exact averages
over the data; `repair` is for networks without BatchNorm: every unit a kernel
writes (a Dense or convolution output in a permutation group) is rescaled so
its mean and standard deviation on the data are the interpolation of the
originals' ones.
"""

from collections.abc import Callable, Iterable
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import align
from mergejax import spec as spec_lib
from mergejax import stacked
from mergejax import stats
from mergejax import trace
from mergejax import tree

PyTree = Any


def _inputs(batches) -> Iterable[Any]:
  for batch in (batches() if callable(batches) else batches):
    yield batch[0] if isinstance(batch, (tuple, list)) else batch


def reset_batch_norm(
    train_apply: Callable[[PyTree, Any], tuple[Any, dict]],
    variables: PyTree,
    batches: Iterable[Any],
) -> PyTree:
  """BatchNorm running statistics recomputed as exact averages over `batches`.

  Works with any running-average update `new = m * old + (1 - m) * batch` (Flax
  linen's BatchNorm): each batch's own statistics are recovered exactly from
  one forward pass at old = 0 and its derivative along old (`jax.jvp`), which
  is m: the forward pass does not read the running statistics, so the
  derivative costs no second pass. The model runs as `trace.evaluate` runs it
  (convolutions on XLA:CPU's slow path as tap sums). Means are averaged over
  the batches weighted by size; a
  `var` beside a `mean` is combined with the spread of the batch means
  (Chan), so the result is the variance over all the data as BatchNorm
  computes it (biased).

  Args:
    train_apply: `(variables, x) -> (out, {"batch_stats": new})`, e.g.
      `lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])`.
    variables: with a `batch_stats` collection.
    batches: inputs (DESIGN.md, batches); a ragged last batch costs one
      compilation (its statistics cannot be masked). The pass compiles once
      per `train_apply` and batch shape, `train_apply` compared by value
      (`stats.ByValue`: a zoo model rebuilt with the same layout reuses it).

  Returns:
    `variables` with `batch_stats` replaced.

  Raises:
    NotImplementedError: under `jax.distributed` with several processes (each
      would average its own batches only and the processes' models would
      differ); run it in one process over all the data.
  """
  if jax.process_count() > 1:
    raise NotImplementedError("reset_batch_norm runs in one process only: with several processes each would"
                              " average its own batches and the processes' models would differ")
  if "batch_stats" not in variables:
    raise ValueError("reset_batch_norm: variables have no batch_stats collection")

  train_apply = stats.ByValue(train_apply)  # equal functions (a rebuilt zoo model) share the compilations
  sums, count = jax.tree.map(lambda s: np.zeros(np.shape(s), jnp.result_type(s)), variables["batch_stats"]), 0
  for x in _inputs(batches):
    sums = _add_batch_statistics(train_apply, sums, variables, x, np.float32(x.shape[0]))
    count += x.shape[0]
  if not count:
    raise ValueError("reset_batch_norm: batches is empty")
  return {**variables, "batch_stats": _averaged(sums, np.float32(count))}


@functools.partial(jax.jit, static_argnums=0)
def _add_batch_statistics(train_apply, sums, variables, x, n):
  """`sums` plus one batch's statistics weighted by its size n (`_with_squared_means`).

  The running-average update `new = m old + (1 - m) batch` at old = 0 gives
  `(1 - m) batch`, and its derivative along old is m. Compiled once per
  (train_apply, shapes): `train_apply` is a `stats.ByValue`.
  """
  updated = lambda running: trace.evaluate(train_apply, {**variables, "batch_stats": running}, x)[1]["batch_stats"]
  zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  new0, m = jax.jvp(updated, (zeros,), (jax.tree.map(jnp.ones_like, zeros),))
  batch = jax.tree.map(lambda n0, m: n0 / jnp.maximum(1 - m, 1e-12), new0, m)
  return jax.tree.map(jnp.add, sums, _with_squared_means(batch, n))


def _averaged(sums, count):
  """The summed statistics over `count` examples, variances back from the squared means (NumPy: a few
  vectors, nothing to compile), on the default device."""
  return jax.device_put(_from_squared_means(jax.tree.map(lambda s: np.asarray(s) / count, sums)))


def _with_squared_means(stats: dict, n: int) -> dict:
  """Per BatchNorm: n * mean, and n * (var + mean^2) for its var."""
  if "mean" in stats and "var" in stats and not isinstance(stats["mean"], dict):
    return {**{k: n * v for k, v in stats.items()}, "var": n * (stats["var"] + stats["mean"] ** 2)}
  return {k: _with_squared_means(v, n) if isinstance(v, dict) else n * v for k, v in stats.items()}


def _from_squared_means(stats: dict) -> dict:
  if "mean" in stats and "var" in stats and not isinstance(stats["mean"], dict):
    return {**stats, "var": np.maximum(stats["var"] - stats["mean"] ** 2, 0.0)}
  return {k: _from_squared_means(v) if isinstance(v, dict) else v for k, v in stats.items()}


def repair(
    spec: spec_lib.PermutationSpec,
    apply_fn: Callable[[PyTree, Any], Any],
    va: PyTree,
    vb: PyTree,
    merged: PyTree,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    t: float = 0.5,
    eps: float = 1e-5,
    missing_bias: str = "error",
    mesh: jax.sharding.Mesh | None = None,
) -> PyTree:
  """REPAIR (Jordan et al. 2023) for networks without BatchNorm.

  For each kernel whose single output axis is a permutation group (a Dense or
  convolution writing hidden units), in forward order: measure each output
  unit's mean and standard deviation (kernel output plus its sibling `bias`)
  on the data in model A, model B (aligned to A) and the merged model, then
  scale the kernel's output units by `sigma_target / sigma_merged` and set the
  bias so the mean is `mu_target`, where target = (1 - t) A + t B. Later
  layers are measured after earlier ones are repaired (one pass per layer).

  A spec with batched groups (layers under `scan`) is repaired copy by copy:
  the scans are unrolled (`trace.kernel_uses(..., unroll_scans=True)`), copy
  l of a stacked kernel is a layer of its own (its bias copy l of the stacked
  sibling bias), in the unrolled model's forward order, so the result is
  REPAIR of the unrolled model stacked back. Only values change, never a
  width, so every per-copy choice fits the stacked form.

  Args:
    spec: the permutation groups of the architecture.
    apply_fn: `apply_fn(variables, x)` in eval mode.
    va: model A's variables.
    vb: model B's variables, aligned to A.
    merged: the merged variables, e.g. `tree.lerp(va, vb, t)`.
    batches: inputs; a callable returning a fresh iterator (several passes).
    t: the interpolation weight of B.
    eps: added to variances.
    missing_bias: what to do with a layer that has no sibling `bias` (a
      bias-free Dense, e.g. Llama's projections), whose mean cannot be set:
      "error" (the default) refuses before any statistics pass, naming every
      such layer; "scale_only" repairs its standard deviation only (its
      output mean becomes the merged mean times the scale).
    mesh: the devices each statistics pass is split over (`stats.accumulate`;
      default every device of every process: under `jax.distributed` each
      process passes its own batches and every process gets the same repair).

  Returns:
    The repaired merged variables.

  Raises:
    ValueError: before any pass over the data, for bias-free layers under
      missing_bias="error", or an unknown `missing_bias`.
  """
  if missing_bias not in ("error", "scale_only"):
    raise ValueError(f"repair: missing_bias must be 'error' or 'scale_only', got {missing_bias!r}")
  tree.check_same_shapes(va, vb)
  tree.check_same_shapes(va, merged)
  if not callable(batches):
    batches = list(batches)
  unroll = bool(spec.batch_sizes)
  uses = _uses_in_order(apply_fn, va, next(iter(_inputs(batches))), unroll)
  if unroll:
    spec = stacked.unstack(spec, va, stacked=stacked.scanned_copies(va, [p for p, _ in uses]))[0]
  written = {(r.path, r.axis) for refs in spec.groups.values() for r in refs
             if r.factor is None and r.part is None}
  layers = [(path, out_axis, k_axis) for path, (out_axis, k_axis) in uses if (path, k_axis) in written]
  leaves = tree.leaves_by_path(merged)
  bias_free = [tree.path_str(path) for path, _, _ in layers if _bias(leaves, path) is None]
  if bias_free and missing_bias == "error":
    raise ValueError(f"repair: {', '.join(bias_free)} have no sibling bias, so their means cannot be"
                     " restored; pass missing_bias='scale_only' to repair their standard deviations only")
  stats_a = _unit_stats(apply_fn, va, batches, layers, eps, mesh, unroll)
  stats_b = _unit_stats(apply_fn, vb, batches, layers, eps, mesh, unroll)
  targets = {}
  for i, layer in enumerate(layers):
    (ma, sa), (mb, sb) = stats_a[i], stats_b[i]
    targets[layer] = ((1 - t) * ma + t * mb, (1 - t) * sa + t * sb)
  for layer in layers:
    mean, std = _unit_stats(apply_fn, merged, batches, [layer], eps, mesh, unroll)[0]
    merged = _rescale(merged, layer, mean, std, *targets[layer])
  return merged


def _uses_in_order(apply_fn, variables, x, unroll_scans) -> list[tuple[tuple[str, ...], tuple[int, int]]]:
  """Kernels used once with one produced axis: (path, (output axis, kernel axis)); with
  `unroll_scans`, each copy of a kernel stacked under a scan (`path + (str(l),)`, its axes)."""
  found = align.traced_kernel_uses(apply_fn, variables, x, unroll_scans)
  return [(path, uses[0].output_axes[0]) for path, uses in found.items()
          if len(uses) == 1 and len(uses[0].output_axes) == 1]


def _copy(leaves, path) -> tuple[tuple[str, ...], int | None]:
  """`(leaf path, copy index)` of a kernel: a leaf as it is (None), or copy l of a stacked
  leaf (`path + (str(l),)`)."""
  return (path, None) if path in leaves else (path[:-1], int(path[-1]))


def _bias(leaves, path) -> tuple[tuple[str, ...], int | None] | None:
  """The kernel's sibling `bias` as `_copy` locates it (a stacked kernel's is its stacked bias's copy), or None."""
  leaf, index = _copy(leaves, path)
  bias = leaf[:-1] + ("bias",)
  if bias not in leaves:
    return None
  if index is not None and (np.ndim(leaves[bias]) < 2 or np.shape(leaves[bias])[0] != np.shape(leaves[leaf])[0]):
    return None  # not stacked with the kernel
  return bias, index


def _read(leaves, located):
  leaf, index = located
  return leaves[leaf] if index is None else leaves[leaf][index]


def _write(leaves, located, value) -> dict:
  leaf, index = located
  return {leaf: value if index is None else jnp.asarray(leaves[leaf]).at[index].set(value)}


@dataclasses.dataclass(frozen=True)
class _UnitOutputs:
  """`(variables, x) -> [f32[..., units]]`: each layer's output units, bias included; a value (`stats.ByValue`
  of `apply_fn`, the layers), so `repair` of one architecture compiles each pass once."""

  apply_fn: stats.ByValue
  layers: tuple[tuple[tuple[str, ...], int, int], ...]
  unroll_scans: bool

  def __call__(self, variables, x):
    _, uses = trace.kernel_uses(self.apply_fn, unroll_scans=self.unroll_scans)(variables, x)
    leaves = tree.leaves_by_path(variables)
    out = []
    for path, out_axis, _ in self.layers:
      y = jnp.moveaxis(uses[path][0].output, out_axis, -1)
      at = _bias(leaves, path)
      bias = None if at is None else _read(leaves, at)
      out.append(y + bias if bias is not None and bias.shape == y.shape[-1:] else y)
    return out


def _unit_stats(apply_fn, variables, batches, layers, eps, mesh, unroll_scans) -> list[tuple[jax.Array, jax.Array]]:
  """Per layer: mean and std of each output unit (bias included) over the data, one streamed pass."""
  features = _UnitOutputs(stats.ByValue(apply_fn), tuple(tuple(layer) for layer in layers), unroll_scans)
  result = stats.accumulate(stats.unit_moments(features), variables, batches, mesh=mesh, progress=False)
  return [(r["mean"], jnp.sqrt(r["var"] + eps)) for r in result]


def _rescale(variables, layer, mean, std, target_mean, target_std):
  path, _, k_axis = layer
  scale = target_std / std
  leaves = tree.leaves_by_path(variables)
  at = _copy(leaves, path)
  kernel = _read(leaves, at)
  shape = [1] * kernel.ndim
  shape[k_axis] = -1
  updates = _write(leaves, at, kernel * scale.reshape(shape))
  bias = _bias(leaves, path)
  if bias is not None:
    updates.update(_write(leaves, bias, (_read(leaves, bias) - mean) * scale + target_mean))
  return tree.replace_leaves(variables, updates)
