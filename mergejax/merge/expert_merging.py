"""Expert Merging: layer-wise coefficients learned by aligning with the experts, and chunking.

Zhang, Ma, Ni, Wu, Shu, Jiang and Chen, "Expert Merging: Model Merging with
Unsupervised Expert Alignment and Importance-Guided Layer Chunking", 2025
(arXiv 2509.25712). The merged model is task arithmetic with a coefficient
per expert and layer (or chunk of a layer),

    theta_l = base_l + sum_k lambda_{k,l} tau_{k,l},   tau_k = models[k] - base,

and the coefficients minimise, on unlabelled calibration inputs D_k of each
expert k, the misalignment of the merged model with that expert:

    L(lambda) = sum_k w_k [ hidden_weight * sum_{l in S} mean_{x in D_k} ||h_l(x; theta) - h_l(x; theta_k)||^2
                            + logit_weight * mean_{x in D_k} KL(p_k(x) || p_theta(x)) ]
                + reg_weight * ||lambda - lambda_init||^2

(p the softmax of the logits over `temperature`; S the hidden states
`apply_fn` returns). Expert Merging++ then gives more coefficients to the
layers that matter: a layer's importance is computed from its learned
coefficients, its task vectors' magnitudes and its parameter count, and a
budget of `chunks` extra coefficients is shared among layers in proportion;
a layer of c chunks splits the output axis (the last) of each of its leaves
into c contiguous slices with one coefficient per expert each, initialised
at the layer's learned coefficient, and all are learned again.

    merged, info = mj.merge.expert_merging(mj.capture(model.apply), base, tuned, calibration)
    merged, info = mj.merge.expert_merging(hidden_fn, base, tuned, calibration, chunks=8,
                                           blocks=mj.merge.blocks_in_read_order(model.apply, base, x[:1]))

`apply_fn(variables, x) -> (logits f32[n, C], hidden)`, hidden a pytree of
f32[n, ...] states; `mj.capture(apply_fn)` returns every kernel's input, the
hidden states between layers.

The authors' code was not public when this was written (github.com/Littleor/
ExpertMerging held a README only): what the paper's abstract and summaries
leave open is an assumption here, listed in DESIGN.md (Expert Merging): the
regulariser is a squared distance to the initial coefficients; a layer's
importance is mean_k |lambda_{k,l}| ||tau_{k,l}||_F normalised to sum 1
(the Frobenius norm grows with the parameter count), and the extra chunks go
by largest remainders, a layer holding at most as many chunks as its widest
leaf has output units; chunks are contiguous slices of the output axis. Each
stage is one jitted `jax.lax.fori_loop` of full-batch optimiser steps (the
paper calibrates on 5-10 inputs per expert).
"""

from collections.abc import Callable, Mapping, Sequence
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax.merge import task_vectors as tv
from mergejax.merge.adamerging import _leaf_groups
from mergejax.merge.adamerging import _task_vectors

PyTree = Any
Blocks = Mapping[str, int | None] | Callable[[str], int | None]
Optimizer = Callable[[Any], optax.GradientTransformation]


class ExpertMergingInfo(NamedTuple):
  """What `expert_merging` learned.

  Attributes:
    coefficients: f32[T, G], each expert's coefficient per column.
    columns: a tree like the base of int32[leaf.shape[-1]] (int32[1] for a
      scalar leaf): the column of each output unit of each leaf.
    layer_coefficients: f32[T, L], the first stage's (one column per layer).
    chunks: int[L], each layer's number of chunks (all 1 without chunking).
    losses: f32[steps] (f32[steps + chunk_steps] with chunks), the objective
      before each step.
  """

  coefficients: jax.Array
  columns: PyTree
  layer_coefficients: jax.Array
  chunks: np.ndarray
  losses: jax.Array


def alignment_loss(
    apply_fn: Callable[..., tuple[jax.Array, PyTree]],
    variables: PyTree,
    inputs: Sequence[PyTree],
    targets: Sequence[tuple[jax.Array, PyTree]],
    *,
    hidden_weight: float = 1.0,
    logit_weight: float = 1.0,
    task_weights: Sequence[float] | jax.Array | None = None,
    temperature: float = 1.0,
) -> jax.Array:
  """f32[]: sum_k w_k (hidden_weight * hidden misalignment + logit_weight * KL), see the module docstring.

  Args:
    apply_fn: (variables, x) -> (logits f32[n, C], hidden pytree of f32[n, ...]).
    variables: the merged model.
    inputs: one calibration batch per expert.
    targets: `apply_fn(models[k], inputs[k])` per expert.
    hidden_weight, logit_weight: the two terms' weights.
    task_weights: w_k (default 1 each).
    temperature: divides the logits of both softmaxes.
  """
  total = jnp.zeros((), jnp.float32)
  for k, (x, (target_logits, target_hidden)) in enumerate(zip(inputs, targets)):
    logits, hidden = apply_fn(variables, x)
    rows = logits.shape[0]
    hid = sum(jnp.sum(jnp.square(h.astype(jnp.float32) - t.astype(jnp.float32))) / rows
              for h, t in zip(jax.tree.leaves(hidden), jax.tree.leaves(target_hidden)))
    log_p = jax.nn.log_softmax(target_logits.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q)) / rows
    weight = 1.0 if task_weights is None else task_weights[k]
    total = total + weight * (hidden_weight * hid + logit_weight * kl)
  return total


# -- merging with per-unit columns ---------------------------------------------------------------


def _merge(base: PyTree, taus: PyTree, coefficients: jax.Array, columns: PyTree) -> PyTree:
  """base + sum_k coefficients[k, columns] tau_k, leaf by leaf, in the base's dtypes."""
  flat, treedef = jax.tree.flatten(base)
  out = []
  for b, tau, cols in zip(flat, treedef.flatten_up_to(taus), treedef.flatten_up_to(columns)):
    lam = coefficients[:, cols].astype(tau.dtype)  # [T, out]
    lam = lam.reshape((-1,) + (1,) * (b.ndim - 1) + (lam.shape[1],)) if b.ndim else lam[:, 0]
    out.append(tv._rebase(b, jnp.sum(lam * tau, axis=0)))
  return treedef.unflatten(out)


@functools.partial(jax.jit, static_argnames=("apply_fn", "optimizer", "steps"))
def _fit(base, taus, columns, inputs, targets, coefficients, anchor, learning_rate, steps, weights, *,
         apply_fn, optimizer):
  """(coefficients f32[T, G] after `steps` steps, f32[steps] the loss before each)."""
  transform = optimizer(learning_rate)
  hidden_weight, logit_weight, reg_weight, temperature, task_weights = weights

  def loss(c):
    merged = _merge(base, taus, c, columns)
    return (alignment_loss(apply_fn, merged, inputs, targets, hidden_weight=hidden_weight,
                           logit_weight=logit_weight, task_weights=task_weights, temperature=temperature)
            + reg_weight * jnp.sum(jnp.square(c - anchor)))

  def step(carry, _):
    c, state = carry
    value, grad = jax.value_and_grad(loss)(c)
    updates, state = transform.update(grad, state, c)
    return (optax.apply_updates(c, updates), state), value

  (coefficients, _), losses = jax.lax.scan(step, (coefficients, transform.init(coefficients)), None, length=steps)
  return coefficients, losses


_merge_jit = jax.jit(_merge)
_apply_jit = jax.jit(lambda variables, x, apply_fn: apply_fn(variables, x), static_argnames="apply_fn")


# -- importance-guided chunking ------------------------------------------------------------------


def layer_importance(layer_coefficients: jax.Array, taus: PyTree, groups: Sequence[int]) -> np.ndarray:
  """f64[L]: mean_k |lambda_{k,l}| ||tau_{k,l}||_F per layer, normalised to sum 1 (uniform if all 0).

  Args:
    layer_coefficients: f32[T, L].
    taus: a tree of f32[T, *leaf.shape] (the stacked task vectors).
    groups: each leaf's layer, in flattening order.
  """
  lam = np.abs(np.asarray(layer_coefficients, np.float64))
  squares = np.zeros(lam.shape, np.float64)
  for tau, g in zip(jax.tree.leaves(taus), groups):
    squares[:, g] += np.sum(np.square(np.asarray(tau, np.float64)).reshape(tau.shape[0], -1), axis=1)
  raw = np.mean(lam * np.sqrt(squares), axis=0)
  return raw / raw.sum() if raw.sum() > 0 else np.full(raw.shape, 1.0 / raw.size)


def allocate_chunks(importance: np.ndarray, extra: int, capacity: np.ndarray) -> np.ndarray:
  """int[L]: 1 + each layer's share of `extra` chunks by importance (largest remainders), capped.

  A layer gets at most `capacity[l]` chunks; what a capped layer cannot take
  goes to the others in the next round, until the budget or the capacity is
  spent.
  """
  chunks = np.ones(len(importance), np.int64)
  capacity = np.asarray(capacity, np.int64)
  left = int(extra)
  while left > 0:
    open_ = chunks < capacity
    if not open_.any():
      break
    share = np.where(open_, importance, 0.0)
    share = share / share.sum() if share.sum() > 0 else open_ / open_.sum()
    quota = share * left
    give = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - give), kind="stable")
    for i in order[: left - give.sum()]:
      if open_[i]:
        give[i] += 1
    give = np.minimum(give, capacity - chunks)
    if give.sum() == 0:
      break
    chunks += give
    left -= int(give.sum())
  return chunks


def _columns(base: PyTree, groups: Sequence[int], chunks: np.ndarray) -> tuple[PyTree, np.ndarray]:
  """(a tree of int32[out] columns, int[G] each column's layer): chunk j of layer l is one column."""
  first = np.concatenate([[0], np.cumsum(chunks)[:-1]])
  flat, treedef = jax.tree.flatten(base)
  cols = []
  for b, g in zip(flat, groups):
    out = b.shape[-1] if np.ndim(b) else 1
    unit_chunk = np.zeros(out, np.int64)
    for j, units in enumerate(np.array_split(np.arange(out), chunks[g])):
      unit_chunk[units] = j
    cols.append(jnp.asarray(first[g] + unit_chunk, jnp.int32))
  return treedef.unflatten(cols), np.repeat(np.arange(len(chunks)), chunks)


# -- checks --------------------------------------------------------------------------------------


def _check_count(name: str, value: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
  return int(value)


def _check_real(name: str, value: float, positive: bool) -> float:
  if not (isinstance(value, numbers.Real) and math.isfinite(value) and (value > 0 if positive else value >= 0)):
    raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")
  return float(value)


def _check_inputs(apply_fn, base, inputs, num_models):
  if isinstance(inputs, (np.ndarray, jax.Array)) or not isinstance(inputs, Sequence) or len(inputs) != num_models:
    raise ValueError(f"inputs: need one calibration set per model ({num_models}), each f32[n, ...] or a pytree"
                     f" of such arrays, got {type(inputs).__name__}"
                     f"{'' if not isinstance(inputs, Sequence) else f' of {len(inputs)}'}")
  for k, x in enumerate(inputs):
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(x)}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
      raise ValueError(f"inputs[{k}]: every array needs the same non-empty leading (example) axis, got"
                       f" {sorted(str(s) for s in sizes)}")
    out = jax.eval_shape(apply_fn, base, jax.tree.map(lambda a: a[:1], x))
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], jax.ShapeDtypeStruct)
            and len(out[0].shape) == 2):
      raise ValueError(f"inputs[{k}]: apply_fn must return (logits f32[n, C], hidden pytree), e.g."
                       f" mj.capture(model.apply); got {jax.tree.map(lambda s: s.shape, out)}")
  return list(inputs)


def expert_merging(
    apply_fn: Callable[..., tuple[jax.Array, PyTree]],
    base: PyTree,
    models: Sequence[PyTree],
    inputs: Sequence[PyTree],
    *,
    blocks: Blocks | None = None,
    chunks: int = 0,
    steps: int = 200,
    chunk_steps: int | None = None,
    learning_rate: float = 1e-2,
    init: float | Sequence[float] = 0.3,
    hidden_weight: float = 1.0,
    logit_weight: float = 1.0,
    reg_weight: float = 0.0,
    task_weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    optimizer: Optimizer = optax.adam,
) -> tuple[PyTree, ExpertMergingInfo]:
  """Expert Merging (and with `chunks` > 0, Expert Merging++): see the module docstring.

  Args:
    apply_fn: (variables, x) -> (logits f32[n, C], hidden pytree of f32[n,
      ...]); `mj.capture(model.apply)` gives every kernel's input. Static
      under jit: pass the same function object to reuse the compilation.
    base: the pre-trained model.
    models: T >= 1 experts fine-tuned from it.
    inputs: T unlabelled calibration sets, inputs[k] from expert k's domain.
    blocks: groups leaves into layers ({path: layer | None} or a callable,
      as `blocks_in_read_order` gives); None: one layer per leaf.
    chunks: extra coefficients per expert that Expert Merging++ shares
      among the layers by importance (0: Expert Merging alone).
    steps: optimiser steps of the layer-wise stage.
    chunk_steps: of the chunked stage (default `steps`).
    learning_rate: > 0.
    init: the initial coefficient, one or one per expert.
    hidden_weight, logit_weight, reg_weight: >= 0, the terms' weights.
    task_weights: w_k >= 0 per expert (default 1 each).
    temperature: > 0.
    optimizer: learning_rate -> optax.GradientTransformation.

  Returns:
    `(merged, ExpertMergingInfo)`; the merged leaves keep the base's dtypes.

  Raises:
    ValueError: anything above out of range, models unlike the base (naming
      the path), inputs not one set per model, or an apply_fn that does not
      return (logits, hidden) — all before any optimisation.
  """
  models = tv._check_models(base, models)
  num = len(models)
  steps = _check_count("steps", steps)
  chunk_steps = steps if chunk_steps is None else _check_count("chunk_steps", chunk_steps)
  chunks = _check_count("chunks", chunks)
  learning_rate = _check_real("learning_rate", learning_rate, True)
  temperature = _check_real("temperature", temperature, True)
  for name, value in (("hidden_weight", hidden_weight), ("logit_weight", logit_weight), ("reg_weight", reg_weight)):
    _check_real(name, value, False)
  weights_k = None if task_weights is None else jnp.asarray(
      tv._per_model_values(task_weights, num, "task_weights", "task weights", nonnegative=True))
  init_k = tv._per_model_values(init, num, "init", "initial coefficients")
  inputs = _check_inputs(apply_fn, base, inputs, num)
  groups, num_layers = _leaf_groups(base, "layer", blocks)

  taus = _task_vectors(base, models)
  targets = [_apply_jit(m, x, apply_fn=apply_fn) for m, x in zip(models, inputs)]
  loss_weights = (float(hidden_weight), float(logit_weight), float(reg_weight), temperature, weights_k)
  fit = functools.partial(_fit, apply_fn=apply_fn, optimizer=optimizer)

  per_layer = np.ones(num_layers, np.int64)
  columns, _ = _columns(base, groups, per_layer)
  start = jnp.asarray(np.repeat(init_k[:, None], num_layers, axis=1))
  layer_coefficients, losses = fit(base, taus, columns, inputs, targets, start, start, jnp.float32(learning_rate),
                                   steps, loss_weights)
  coefficients = layer_coefficients
  if chunks:
    capacity = np.ones(num_layers, np.int64)
    for b, g in zip(jax.tree.leaves(base), groups):
      capacity[g] = max(capacity[g], b.shape[-1] if np.ndim(b) else 1)
    per_layer = allocate_chunks(layer_importance(layer_coefficients, taus, groups), chunks, capacity)
    columns, layer_of_column = _columns(base, groups, per_layer)
    anchor = jnp.asarray(np.repeat(init_k[:, None], len(layer_of_column), axis=1))
    coefficients, more = fit(base, taus, columns, inputs, targets, layer_coefficients[:, layer_of_column], anchor,
                             jnp.float32(learning_rate), chunk_steps, loss_weights)
    losses = jnp.concatenate([losses, more])
  merged = _merge_jit(base, taus, coefficients, columns)
  return merged, ExpertMergingInfo(coefficients, columns, layer_coefficients, per_layer, losses)
