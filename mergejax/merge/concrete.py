"""Concrete subspace learning: a shared mask over task-vector entries, learned by entropy.

Tang, Shen, Zhang, Chen, Xu, Tao and Du, "Concrete Subspace Learning based
Interference Elimination for Multi-task Model Fusion" (arXiv 2312.06173).
One mask m, shared by every task, multiplies each task vector entry by entry
before they are merged:

    theta(m) = base + sum_k lambda_k (m / mean(m)) * tau_k        (per leaf)

The mask's entries are relaxed Bernoulli (Concrete, Gumbel-sigmoid) samples
with learned logits l,

    m = sigmoid((l + log u - log(1 - u)) / temperature),   u ~ U(0, 1),

so the entropy of the merged model's predictions on unlabelled inputs
(`adamerging.entropy_loss`) is differentiable in l; Adam on l minimises its
expectation. As the temperature falls the sample tends to the hard mask
1[l + log u - log(1 - u) > 0], a Bernoulli(sigmoid(l)) sample
(`concrete_mask(..., hard=True)`, same key).

    merged, mask = mj.merge.concrete_task_arithmetic(apply_fn, base, [v1, v2], [x1, x2], key=key)
    merged, lam, mask = mj.merge.concrete_adamerging(apply_fn, base, [v1, v2], [x1, x2], key=key)

Transcribed from FusionBench (`tanganke/fusion_bench`,
`fusion_bench/method/concrete_subspace/clip_concrete_task_arithmetic.py`,
`clip_concrete_adamerging.py`, `fusion_bench/models/masks/mask_model.py`),
whose configurations give the defaults: logits start at 0, temperature 0.5,
Adam with learning rate 1e-3 on the logits, each leaf's mask divided by its
mean (`m / mean(m)`, here 0 where the mean is 0), the loss of a step the sum
over tasks of each task's mean entropy.

- Concrete task arithmetic: the coefficients are fixed (`scale`, FusionBench's
  `scaling_factor` 0.3); each step samples a mask and takes one step on l.
- Concrete AdaMerging, in two stages. (1) Meta-learn the mask: each step
  samples a mask, resets the coefficients to `init`, takes one step of the
  inner optimiser (learning rate `inner_learning_rate`, FusionBench's
  `base_lr` 1, its state kept from step to step) on them with the mask held
  fixed, then one step on l of the entropy at the updated coefficients, held
  fixed (first order: no gradient through the inner step); the two entropies
  are on separate batches. (2) AdaMerging (`adamerging`) of the coefficients
  from `init` with the final mask fixed.

The final mask is one more sample (`final_mask="continuous"`, FusionBench's
`eval_mask_type`, at the training temperature) or its hard limit
(`"discrete"`). As in `adamerging`, every leaf is masked and merged
(FusionBench masks only trainable parameters); each stage is one jit-compiled
`fori_loop` whose step counts, learning rates, temperature, clipping and key
are traced.
"""

from collections.abc import Callable, Sequence
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax.merge.adamerging import (
    Blocks, Optimizer, _check_granularity, _check_inputs, _check_optimizer, _check_positive, _check_steps, _draw, _fit_coefficients, _initial_coefficients, _leaf_groups, _merge, _merge_jit, _project, _task_vectors, entropy_loss,
)
from mergejax.merge import task_vectors as tv

PyTree = Any
FINAL_MASKS = ("continuous", "discrete")


def _noise(logits: PyTree, key: jax.Array) -> list[jax.Array]:
  """Logistic noise like each leaf of `logits` (flattening order), from one draw.

  A single random-bits generator compiles several times faster than one per leaf.
  """
  flat = jax.tree.leaves(logits)
  sizes = [np.size(l) for l in flat]
  draws = jnp.split(jax.random.logistic(key, (sum(sizes),), jnp.float32), np.cumsum(sizes)[:-1])
  return [g.reshape(np.shape(l)) for g, l in zip(draws, flat)]


def _relax(logits: PyTree, noise: list[jax.Array], temperature: jax.Array, hard: bool) -> PyTree:
  """sigmoid((l + g) / temperature) per entry, or 1[l + g > 0] when `hard`."""
  flat, treedef = jax.tree.flatten(logits)
  out = []
  for l, g in zip(flat, noise):
    noisy = jnp.asarray(l, jnp.float32) + g
    out.append((noisy > 0).astype(jnp.float32) if hard else jax.nn.sigmoid(noisy / temperature))
  return treedef.unflatten(out)


@functools.partial(jax.jit, static_argnames="hard")
def _sample(logits: PyTree, key: jax.Array, temperature: jax.Array, hard: bool) -> PyTree:
  """`concrete_mask` of checked arguments."""
  return _relax(logits, _noise(logits, key), temperature, hard)


def concrete_mask(logits: PyTree, key: jax.Array, *, temperature: float = 0.5, hard: bool = False) -> PyTree:
  """A Concrete (relaxed Bernoulli) sample of every entry of a tree of logits.

  The logistic noise g = log u - log(1 - u), u ~ U(0, 1), of every entry is
  one draw `jax.random.logistic(key, (total entries,))` cut into the leaves
  in flattening order (each leaf row-major).

  Args:
    logits: any pytree of arrays l (f32[...]).
    key: the random key.
    temperature: > 0; the relaxation's temperature.
    hard: the limit temperature -> 0 of the same sample: 1[l + g > 0], a
      Bernoulli(sigmoid(l)) sample (0.0 or 1.0).

  Returns:
    A tree like `logits` of f32 masks in [0, 1]: sigmoid((l + g) / temperature),
    or the hard mask.

  Raises:
    ValueError: temperature not finite and > 0.
  """
  temperature = _check_positive("temperature", temperature)
  return _sample(logits, key, jnp.float32(temperature), bool(hard))


@jax.jit
def _rescale(mask: PyTree) -> PyTree:
  """Each leaf divided by its mean (0 where the mean is 0): FusionBench's m / mean(m)."""
  def leaf(m):
    mean = jnp.mean(m)
    return jnp.where(mean > 0, m / jnp.where(mean > 0, mean, 1.0), 0.0)
  return jax.tree.map(leaf, mask)


@functools.partial(jax.jit, static_argnames=("apply_fn", "groups", "optimizer", "batch_size"))
def _fit_logits(
    base: PyTree,
    taus: PyTree,
    inputs: list[PyTree],
    classes: tuple[jax.Array, ...] | None,
    coefficients: jax.Array,
    logits: PyTree,
    learning_rate: jax.Array,
    inner_learning_rate: jax.Array,
    temperature: jax.Array,
    steps: jax.Array,
    clip: jax.Array,
    inner: jax.Array,
    key: jax.Array,
    *,
    apply_fn: Callable[..., jax.Array],
    groups: tuple[int, ...],
    optimizer: Optimizer,
    batch_size: int | None,
) -> PyTree:
  """The mask logits after `steps` steps (with one inner coefficient step each when `inner`).

  `inner` is traced (a `lax.cond`), so Concrete TA and Concrete AdaMerging share one compilation.
  """
  transform = optimizer(learning_rate)
  inner_transform = optimizer(inner_learning_rate)

  def loss(c, mask, batches):
    return entropy_loss(apply_fn, _merge(base, taus, c, groups, _rescale(mask)), batches, classes)

  def step(i, carry):
    l, state, inner_state = carry
    k = jax.random.fold_in(key, i)  # the step's mask; its batches fold in 1 and 2
    noise = _noise(l, k)  # drawn once: both uses of the step's mask share it
    sample = lambda l: _relax(l, noise, temperature, False)

    def inner_step(inner_state):
      batches = _draw(inputs, jax.random.fold_in(k, 1), batch_size)
      grad = jax.grad(loss)(coefficients, jax.lax.stop_gradient(sample(l)), batches)
      updates, inner_state = inner_transform.update(grad, inner_state, coefficients)
      return _project(optax.apply_updates(coefficients, updates), clip), inner_state

    c, inner_state = jax.lax.cond(inner, inner_step, lambda s: (coefficients, s), inner_state)
    batches = _draw(inputs, jax.random.fold_in(k, 2), batch_size)
    updates, state = transform.update(jax.grad(lambda l: loss(c, sample(l), batches))(l), state, l)
    return optax.apply_updates(l, updates), state, inner_state

  carry = (logits, transform.init(logits), inner_transform.init(coefficients))
  logits, _, _ = jax.lax.fori_loop(0, steps, step, carry)
  return logits


def _check_concrete(key, temperature, init_logits, final_mask) -> tuple[float, float]:
  if key is None:
    raise ValueError("Concrete masks are random samples: pass a key")
  temperature = _check_positive("temperature", temperature)
  if not (isinstance(init_logits, numbers.Real) and math.isfinite(init_logits)):
    raise ValueError(f"init_logits must be finite, got {init_logits!r}")
  if final_mask not in FINAL_MASKS:
    raise ValueError(f"final_mask must be one of {FINAL_MASKS}, got {final_mask!r}")
  return temperature, float(init_logits)


def _learn_mask(
    apply_fn, base, taus, inputs, classes, coefficients, groups, *, steps, learning_rate,
    inner_learning_rate, temperature, init_logits, final_mask, batch_size, key, optimizer, clip,
    inner,
) -> PyTree:
  """The final mask (a tree like base, f32 in [0, 1]) after learning its logits."""
  fit_key, final_key = jax.random.split(key)
  logits = jax.tree.map(lambda b: jnp.full(np.shape(b), init_logits, jnp.float32), base)
  logits = _fit_logits(
      base, taus, inputs, classes, coefficients, logits, jnp.float32(learning_rate),
      jnp.float32(inner_learning_rate), jnp.float32(temperature), steps, clip, inner, fit_key,
      apply_fn=apply_fn, groups=groups, optimizer=optimizer, batch_size=batch_size,
  )
  return _sample(logits, final_key, jnp.float32(temperature), final_mask == "discrete")


def concrete_task_arithmetic(
    apply_fn: Callable[..., jax.Array],
    base: PyTree,
    models: Sequence[PyTree],
    inputs: Sequence[PyTree],
    *,
    key: jax.Array,
    scale: float | Sequence[float] = 0.3,
    steps: int = 1000,
    learning_rate: float = 1e-3,
    temperature: float = 0.5,
    init_logits: float = 0.0,
    final_mask: str = "continuous",
    batch_size: int | None = None,
    classes: Sequence[Sequence[int]] | None = None,
    optimizer: Optimizer = optax.adam,
) -> tuple[PyTree, PyTree]:
  """Concrete task arithmetic: base + scale_k (m / mean(m)) tau_k with a learned mask m.

  Args:
    apply_fn, base, models, inputs, batch_size, classes, optimizer: as for
      `adamerging`.
    key: the random key (mask samples, batches).
    scale: each model's fixed coefficient (one for all, or one per model).
    steps: optimiser steps on the mask logits.
    learning_rate: their learning rate.
    temperature: the Concrete relaxation's temperature.
    init_logits: every logit's starting value (0: keep probability 1/2).
    final_mask: "continuous" (a relaxed sample) or "discrete" (its hard limit).

  Returns:
    `(merged, mask)`: the merged model (the base's dtypes) and the final mask,
    a tree like base of f32 in [0, 1] before the per-leaf rescaling.

  Raises:
    ValueError (before any optimisation): as for `adamerging`, a scale not
    finite or not one per model, no key, a temperature not finite and > 0,
    non-finite init_logits, or an unknown final_mask.
  """
  models = tv._check_models(base, models)
  scales = tv._model_scales(scale, len(models))
  steps = _check_steps("steps", steps)
  learning_rate = _check_positive("learning_rate", learning_rate)
  temperature, init_logits = _check_concrete(key, temperature, init_logits, final_mask)
  optimizer = _check_optimizer(optimizer)
  inputs, classes = _check_inputs(apply_fn, base, inputs, classes, batch_size, key)
  groups, _ = _leaf_groups(base, "task", None)
  coefficients = jnp.asarray(scales[:, None])
  taus = _task_vectors(base, models)
  mask = _learn_mask(
      apply_fn, base, taus, inputs, classes, coefficients, groups, steps=steps,
      learning_rate=learning_rate, inner_learning_rate=learning_rate, temperature=temperature,
      init_logits=init_logits, final_mask=final_mask, batch_size=batch_size, key=key,
      optimizer=optimizer, clip=False, inner=False,
  )
  return _merge_jit(base, taus, coefficients, groups, _rescale(mask)), mask


def concrete_adamerging(
    apply_fn: Callable[..., jax.Array],
    base: PyTree,
    models: Sequence[PyTree],
    inputs: Sequence[PyTree],
    *,
    key: jax.Array,
    granularity: str = "task",
    blocks: Blocks | None = None,
    mask_steps: int = 1000,
    mask_learning_rate: float = 1e-3,
    inner_learning_rate: float = 1.0,
    steps: int = 1000,
    learning_rate: float = 1e-3,
    init: float | Sequence[float] = 0.3,
    clip: bool = False,
    temperature: float = 0.5,
    init_logits: float = 0.0,
    final_mask: str = "continuous",
    batch_size: int | None = None,
    classes: Sequence[Sequence[int]] | None = None,
    optimizer: Optimizer = optax.adam,
) -> tuple[PyTree, jax.Array, PyTree]:
  """Concrete AdaMerging: a meta-learned shared mask, then AdaMerging under it.

  Args:
    apply_fn, base, models, inputs, granularity, blocks, init, clip,
      batch_size, classes, optimizer: as for `adamerging`.
    key: the random key (mask samples, batches).
    mask_steps: stage 1's steps on the mask logits (FusionBench: 1000).
    mask_learning_rate: their learning rate (1e-3).
    inner_learning_rate: the inner step's learning rate on the coefficients
      (FusionBench's `base_lr`, 1).
    steps: stage 2's AdaMerging steps (1000).
    learning_rate: stage 2's learning rate (1e-3).
    temperature, init_logits, final_mask: as for `concrete_task_arithmetic`.

  Returns:
    `(merged, coefficients, mask)`: the merged model, the coefficients
    (f32[T] task-wise, f32[T, G] layer-wise, as `adamerging`'s) and the final
    mask (f32 in [0, 1], before the per-leaf rescaling).

  Raises:
    ValueError (before any optimisation): as for `adamerging` and
    `concrete_task_arithmetic`, and for bad mask_steps or learning rates.
  """
  granularity = _check_granularity(granularity, blocks)
  models = tv._check_models(base, models)
  mask_steps = _check_steps("mask_steps", mask_steps)
  steps = _check_steps("steps", steps)
  rates = {name: _check_positive(name, value) for name, value in (
      ("mask_learning_rate", mask_learning_rate), ("inner_learning_rate", inner_learning_rate),
      ("learning_rate", learning_rate))}
  temperature, init_logits = _check_concrete(key, temperature, init_logits, final_mask)
  optimizer = _check_optimizer(optimizer)
  groups, columns = _leaf_groups(base, granularity, blocks)
  initial = _initial_coefficients(init, len(models), columns)
  inputs, classes = _check_inputs(apply_fn, base, inputs, classes, batch_size, key)
  taus = _task_vectors(base, models)
  mask_key, ada_key = jax.random.split(key)
  mask = _learn_mask(
      apply_fn, base, taus, inputs, classes, initial, groups, steps=mask_steps,
      learning_rate=rates["mask_learning_rate"], inner_learning_rate=rates["inner_learning_rate"],
      temperature=temperature, init_logits=init_logits, final_mask=final_mask,
      batch_size=batch_size, key=mask_key, optimizer=optimizer, clip=bool(clip), inner=True,
  )
  rescaled = _rescale(mask)
  coefficients = _fit_coefficients(
      base, taus, rescaled, inputs, classes, initial, jnp.float32(rates["learning_rate"]), steps,
      bool(clip), None if batch_size is None else ada_key,
      apply_fn=apply_fn, groups=groups, optimizer=optimizer, batch_size=batch_size,
  )
  merged = _merge_jit(base, taus, coefficients, groups, rescaled)
  return merged, coefficients[:, 0] if granularity == "task" else coefficients, mask
