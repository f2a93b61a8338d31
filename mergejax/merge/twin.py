"""Twin-Merging: shared knowledge, SVD-compressed exclusive knowledge, and a router.

Lu, Fan, Wei, Xia, Jin, Gong, Ye and Sun, "Twin-Merging: Dynamic Integration
of Modular Expertise in Model Merging", NeurIPS 2024 (arXiv 2406.15479).

    shared = mj.merge.task_arithmetic(base, tuned, scale=0.3)     # or mj.merge.ties(...)
    parts = mj.merge.twin_parts(shared, tuned, rank=4)
    router = mj.merge.twin_router_train(features, task_ids, len(tuned), key=key)
    weights = jax.nn.softmax(mj.merge.twin_router(router, features_test))   # f32[n, T]
    logits = mj.merge.twin_apply(apply_fn, parts, weights, x_test)

1. Shared knowledge: a merge of the task models (the paper uses task
   arithmetic or TIES; the caller passes it in).
2. Exclusive knowledge of task t: `models[t] - shared`, compressed by a
   rank-r truncated SVD at every leaf of two or more axes (reshaped to
   `[in, out]` as in `mergejax.merge.lora`: `out` the last axis). Leaves of
   fewer axes (biases, norms) are kept whole: they are a vanishing share of
   the parameters. (The authors' discriminative code sparsifies every
   difference by magnitude instead; the paper compresses by SVD.)
3. A router: an MLP on features of the input computed by the shared model
   (the paper: the mean-pooled last hidden state), trained with cross-entropy
   to predict which task an input comes from on a small labelled validation
   slice. Its softmax weighs the exclusive parts per input:

       theta(x) = shared + sum_t softmax(router(features(x)))_t exclusive_t.

   The authors' router (`discriminative/router.py` of
   LZY-the-boys/Twin-Merging) has two hidden layers of width 2 d with batch
   norm, leaky ReLU and dropout, trained with Adam at 5e-4; here the features
   are standardised with the training set's mean and std (in place of batch
   norm) and the MLP is trained full-batch without dropout.
4. `twin_apply`: the merged model of each input, formed per example and
   applied to it (blocks of `chunk` examples, each block one jitted vmap),
   the authors' per-example `functional_call`.
   Its cost is one kernel product `[in, T r] @ [T r, out]` per example and
   kernel, so it fits small models; memory is `chunk` copies of the model.

Everything is float32 (or wider); merged leaves keep the shared model's dtypes.
"""

from collections.abc import Callable, Sequence
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mergejax.merge import task_vectors as tv
from mergejax.merge.lora import LoRA

PyTree = Any
HIGHEST = jax.lax.Precision.HIGHEST


class TwinParts(NamedTuple):
  """Twin-Merging's modular knowledge.

  Attributes:
    shared: the merged model (the shared knowledge).
    exclusive: a tree like `shared`: at each leaf of >= 2 axes a
      `LoRA(down: f32[T, in, k], up: f32[T, k, out])`, task t's compressed
      `models[t] - shared` being `down[t] @ up[t]` (k = min(rank, in, out));
      at every other leaf f32[T, *leaf.shape], the differences kept whole.
  """

  shared: PyTree
  exclusive: PyTree


def _check_rank(rank: int) -> int:
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
    raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
  return int(rank)


@functools.partial(jax.jit, static_argnums=2)
def _compress_leaf(shared: jax.Array, tuned: jax.Array, rank: int) -> LoRA:
  """Task t's rank-k factors of tuned[t] - shared: down f32[T, in, k], up f32[T, k, out]."""
  delta = (tuned.astype(jnp.float32) - shared.astype(jnp.float32)).reshape(tuned.shape[0], -1, shared.shape[-1])
  u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
  k = min(rank, s.shape[-1])
  return LoRA(u[:, :, :k] * s[:, None, :k], vt[:, :k])


def twin_parts(shared: PyTree, models: Sequence[PyTree], rank: int) -> TwinParts:
  """Shared knowledge and each task model's exclusive knowledge, compressed.

  Args:
    shared: the merge of the models (task arithmetic or TIES in the paper).
    models: T >= 1 task models of the shared model's structure and shapes.
    rank: r >= 1, the rank kept of every exclusive kernel; r >= min(in, out)
      keeps it exactly.

  Returns:
    `TwinParts(shared, exclusive)`; `twin_variables(parts, one_hot(t))` is
    `models[t]` at full rank.

  Raises:
    ValueError: no models, a model whose structure or shapes differ from
      the shared model's (naming the path), or a bad rank.
  """
  models = tv._check_models(shared, models)
  rank = _check_rank(rank)
  flat, treedef = jax.tree.flatten(shared)
  stacked = [jnp.stack(leaves) for leaves in zip(*(treedef.flatten_up_to(m) for m in models))]
  exclusive = [
      _compress_leaf(s, t, rank) if np.ndim(s) >= 2 else t.astype(jnp.float32) - jnp.asarray(s, jnp.float32)
      for s, t in zip(flat, stacked)
  ]
  return TwinParts(shared, treedef.unflatten(exclusive))


def _mixed_leaf(shared: jax.Array, exclusive: LoRA | jax.Array, weights: jax.Array) -> jax.Array:
  """shared + sum_t weights[t] exclusive_t at one leaf, in the shared leaf's dtype."""
  if isinstance(exclusive, LoRA):
    num, inner, k = exclusive.down.shape
    down = jnp.moveaxis(exclusive.down * weights[:, None, None], 0, 1).reshape(inner, num * k)
    delta = jnp.matmul(down, exclusive.up.reshape(num * k, -1), precision=HIGHEST).reshape(shared.shape)
  else:
    delta = jnp.tensordot(weights, exclusive, axes=1, precision=HIGHEST)
  return tv._rebase(shared, delta)


def _mixed(parts: TwinParts, weights: jax.Array) -> PyTree:
  flat, treedef = jax.tree.flatten(parts.shared)
  exclusive = treedef.flatten_up_to(parts.exclusive)
  return treedef.unflatten([_mixed_leaf(s, e, weights) for s, e in zip(flat, exclusive)])


def _num_tasks(parts: TwinParts) -> int:
  """T, after checking that `parts` is a TwinParts with exclusive parts like its shared model."""
  if not isinstance(parts, TwinParts):
    raise ValueError(f"parts must be a TwinParts (from twin_parts), got {type(parts).__name__}")
  flat, treedef = jax.tree.flatten(parts.shared)
  try:
    exclusive = treedef.flatten_up_to(parts.exclusive)
  except (ValueError, TypeError) as e:
    raise ValueError(f"parts.exclusive does not have the shared model's structure: {e}") from None
  sizes = {np.shape(e.down if isinstance(e, LoRA) else e)[0] for e in exclusive}
  if len(sizes) != 1:
    raise ValueError(f"parts.exclusive: leaves disagree on the number of tasks: {sorted(sizes)}")
  return sizes.pop()


_mixed_jit = jax.jit(_mixed)


def twin_variables(parts: TwinParts, weights: jax.Array) -> PyTree:
  """One merged model: shared + sum_t weights[t] exclusive_t.

  Args:
    parts: `twin_parts(...)`.
    weights: f32[T], the tasks' weights (a router's softmax for one input;
      a one-hot row gives task t's model back).

  Raises:
    ValueError: bad parts, or weights that are not f32[T] or not finite.
  """
  num = _num_tasks(parts)
  weights = np.asarray(weights, np.float32)
  if weights.shape != (num,) or not np.all(np.isfinite(weights)):
    raise ValueError(f"weights must be finite f32[{num}] (one per task), got shape {weights.shape}")
  return _mixed_jit(parts, jnp.asarray(weights))


# -- the router ----------------------------------------------------------------------------------


def twin_router_init(key: jax.Array, num_features: int, num_tasks: int, hidden: int | None = None) -> dict:
  """A router's parameters: an MLP d -> h -> h -> T (h = 2 d by default, as the authors').

  Returns:
    `{"mean": f32[d], "std": f32[d], "layers": [{"w": f32[in, out], "b":
    f32[out]}] * 3}`; mean 0 and std 1 (`twin_router_train` sets them from
    its features), weights drawn with LeCun-normal scaling, biases 0.
  """
  for name, value in (("num_features", num_features), ("num_tasks", num_tasks)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  hidden = 2 * num_features if hidden is None else hidden
  if isinstance(hidden, bool) or not isinstance(hidden, numbers.Integral) or hidden < 1:
    raise ValueError(f"hidden must be an integer >= 1 or None, got {hidden!r}")
  return _init_router(key, (int(num_features), int(hidden), int(hidden), int(num_tasks)))


@functools.partial(jax.jit, static_argnums=1)
def _init_router(key: jax.Array, sizes: tuple[int, ...]) -> dict:
  keys = jax.random.split(key, len(sizes) - 1)
  layers = [{"w": jax.random.normal(k, (a, b), jnp.float32) / math.sqrt(a), "b": jnp.zeros(b, jnp.float32)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
  return {"mean": jnp.zeros(sizes[0], jnp.float32), "std": jnp.ones(sizes[0], jnp.float32), "layers": layers}


@jax.jit
def twin_router(router: dict, features: jax.Array) -> jax.Array:
  """f32[n, T]: the router's logits (softmax them for the tasks' weights).

  Args:
    router: `twin_router_init` / `twin_router_train` parameters.
    features: f32[n, d], the shared model's features of n inputs.
  """
  h = (jnp.asarray(features, jnp.float32) - router["mean"]) / router["std"]
  *hidden, last = router["layers"]
  for layer in hidden:
    h = jax.nn.leaky_relu(h @ layer["w"] + layer["b"])
  return h @ last["w"] + last["b"]


@functools.partial(jax.jit, static_argnames="optimizer")
def _train_router(router, features, labels, learning_rate, steps, *, optimizer):
  transform = optimizer(learning_rate)
  params = router["layers"]

  def loss(layers):
    logits = twin_router({**router, "layers": layers}, features)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(_, carry):
    layers, state = carry
    updates, state = transform.update(jax.grad(loss)(layers), state, layers)
    return optax.apply_updates(layers, updates), state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, transform.init(params)))
  return {**router, "layers": params}


def twin_router_train(
    features: jax.Array,
    labels: jax.Array,
    num_tasks: int,
    *,
    key: jax.Array,
    hidden: int | None = None,
    steps: int = 500,
    learning_rate: float = 5e-4,
    optimizer: Callable[[Any], optax.GradientTransformation] = optax.adam,
) -> dict:
  """A router trained to predict each input's task (cross-entropy, full batch, jitted).

  Args:
    features: f32[n, d], the shared model's features of labelled inputs (a
      validation slice held out of the task models' training).
    labels: int[n], each input's task in [0, num_tasks).
    num_tasks: T.
    key: initialises the MLP.
    hidden: the hidden width (default 2 d).
    steps: optimiser steps (>= 0).
    learning_rate: > 0 (the authors': 5e-4 with Adam).
    optimizer: learning_rate -> optax.GradientTransformation.

  Returns:
    The router's parameters (see `twin_router_init`), its features'
    standardisation set from `features` (std floored at 1e-6).
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  if features.ndim != 2 or features.shape[0] < 1 or not np.all(np.isfinite(features)):
    raise ValueError(f"features must be finite f32[n, d] with n >= 1, got shape {features.shape}")
  if labels.shape != features.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be int[{features.shape[0]}] (one task per row of features),"
                     f" got {labels.dtype}{list(labels.shape)}")
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral) or num_tasks < 1:
    raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
  if labels.min() < 0 or labels.max() >= num_tasks:
    raise ValueError(f"labels must be tasks in [0, {num_tasks}), got values in [{labels.min()}, {labels.max()}]")
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
    raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
  if not (isinstance(learning_rate, numbers.Real) and math.isfinite(learning_rate) and learning_rate > 0):
    raise ValueError(f"learning_rate must be finite and > 0, got {learning_rate!r}")
  router = twin_router_init(key, features.shape[1], int(num_tasks), hidden)
  router["mean"] = jnp.asarray(features.mean(0))
  router["std"] = jnp.asarray(np.maximum(features.std(0), 1e-6))
  return _train_router(router, jnp.asarray(features), jnp.asarray(labels, jnp.int32), jnp.float32(learning_rate),
                       int(steps), optimizer=optimizer)


# -- per-input apply -----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="apply_fn")
def _apply_block(parts, weights, x, *, apply_fn):
  """Outputs of one block of inputs, each through its own merged model (vmapped)."""
  def one(w, xi):
    return apply_fn(_mixed(parts, w), jax.tree.map(lambda a: a[None], xi))[0]

  return jax.vmap(one)(weights, x)


def twin_apply(
    apply_fn: Callable[..., Any],
    parts: TwinParts,
    weights: jax.Array,
    x: PyTree,
    *,
    chunk: int = 16,
) -> Any:
  """Each input through its own merged model: apply_fn(twin_variables(parts, weights[i]), x[i:i+1])[0].

  Args:
    apply_fn: (variables, inputs) -> outputs with the example axis first
      (static under jit: pass the same function object to reuse the
      compilation).
    parts: `twin_parts(...)`.
    weights: f32[n, T], each input's task weights (a router's softmax).
    x: f32[n, ...] (or a pytree of arrays with the examples first).
    chunk: examples vmapped at once (memory: `chunk` merged models). Blocks
      of exactly `chunk` inputs (the last padded with zeros), so one
      compilation serves every n.

  Returns:
    The outputs of the n inputs, concatenated (f32[n, ...]).

  Raises:
    ValueError: bad parts, weights that are not finite f32[n, T], inputs
      without n examples, or a chunk below 1.
  """
  num = _num_tasks(parts)
  weights = np.asarray(weights, np.float32)
  if weights.ndim != 2 or weights.shape[1] != num or not np.all(np.isfinite(weights)):
    raise ValueError(f"weights must be finite f32[n, {num}] (one row per input), got shape {weights.shape}")
  sizes = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(x)}
  if sizes != {weights.shape[0]}:
    raise ValueError(f"x: every array needs the {weights.shape[0]} examples of weights on its first axis,"
                     f" got leading sizes {sorted(str(s) for s in sizes)}")
  if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
    raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
  n = weights.shape[0]
  outs = []
  for start in range(0, n, chunk):
    pad = max(0, start + chunk - n)

    def block(a):
      a = np.asarray(a[start:start + chunk])
      return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])

    block_w, block_x = jax.tree.map(block, (weights, x))
    out = _apply_block(parts, block_w, block_x, apply_fn=apply_fn)
    outs.append(jax.tree.map(lambda a: a[: chunk - pad], out))
  return jax.tree.map(lambda *a: jnp.concatenate(a), *outs)
