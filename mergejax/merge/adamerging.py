"""AdaMerging: task-arithmetic coefficients learned by entropy minimisation.

Yang, Wang, Shen, Liu, Guo, Wang and Tao, "AdaMerging: Adaptive Model Merging
for Multi-Task Learning", ICLR 2024 (arXiv 2310.02575). The merged model is
task arithmetic with learned coefficients,

    task-wise:   theta = base + sum_k lambda_k tau_k
    layer-wise:  theta_l = base_l + sum_k lambda_{k,l} tau_{k,l}

(tau_k = models[k] - base; l a group of leaves), and the coefficients
minimise the Shannon entropy of the merged model's predictions on unlabelled
inputs, the sum over input sets (one per task) of the mean entropy of the
softmax of each input's logits:

    min_lambda  sum_t mean_{x in inputs[t]} H(softmax(f(theta(lambda), x)))

    merged, lam = mj.merge.adamerging(apply_fn, base, [v1, v2], [x1, x2])
    merged, lam = mj.merge.adamerging(apply_fn, base, [v1, v2], [x1, x2], granularity="layer",
                                      blocks=mj.merge.blocks_in_read_order(apply_fn, base, x1[:1]))

As FusionBench implements it (`tanganke/fusion_bench`,
`fusion_bench/method/adamerging/` and `fusion_bench/models/wrappers/
task_wise_fusion.py`, `layer_wise_fusion.py`, whose CLIP configuration gives
the defaults here: Adam, learning rate 1e-3, coefficients starting at 0.3):
the loss of a step is the sum over tasks of `entropy_loss` of one batch of
each task's inputs, one optimiser step on the coefficients follows, and the
layer-wise coefficients are one per parameter tensor (here: one per leaf
with `blocks=None`, or one per block of leaves). Differences: FusionBench
clamps the coefficients to [0, 1] inside the forward pass when
`clamp_weights` (off in its configurations), so a coefficient past a bound
gets no gradient; here `clip=True` projects them onto [0, 1] after every
step, so the returned coefficients are the ones merged. FusionBench merges
only trainable parameters (buffers such as BatchNorm statistics stay the
base's); here every leaf of the variables is merged, as everywhere in
`mj.merge`. The entropy is computed from `log_softmax` (FusionBench adds
1e-8 inside the log).

The whole optimisation is one jit-compiled `jax.lax.fori_loop` (the number of
steps, the learning rate, the initial coefficients and the key are traced:
and whether to clip are traced: changing them compiles nothing; `apply_fn`, the
optimizer, the groups and the batch size are static). Task vectors are computed once, in float32 (or
wider), stacked per leaf as f32[T, *leaf.shape]; the merged leaves keep the
base's dtypes. The same loop, on any objective of the merged model in place
of the entropy (`_fit_to_objective`), learns FW-Soft's weights
(`mergejax.merge.frank_wolfe`).
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

from mergejax import tree
from mergejax.merge import task_vectors as tv
from mergejax.merge.lines import _leaf_blocks

PyTree = Any
Blocks = Mapping[str, int | None] | Callable[[str], int | None]
Optimizer = Callable[[Any], optax.GradientTransformation]
GRANULARITIES = ("task", "layer")


def _entropies(logits: jax.Array) -> jax.Array:
  """f32[n]: each example's Shannon entropy of softmax(logits), averaged over its middle axes.

  Args:
    logits: f32[n, ..., classes].
  """
  log_p = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  h = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  return jnp.mean(h.reshape(h.shape[0], -1), axis=1)


def prediction_entropy(logits: jax.Array) -> jax.Array:
  """The mean Shannon entropy (nats) of softmax(logits) over all but the last axis.

  Args:
    logits: f32[..., classes].

  Returns:
    f32[]: mean over the leading axes of -sum_c p_c log p_c, p = softmax(logits).
  """
  logits = jnp.asarray(logits, jnp.float32)
  return jnp.mean(_entropies(logits.reshape((-1,) + logits.shape[-1:])))


def _joinable(batches: Sequence[PyTree]) -> bool:
  """Whether the batches' examples have one structure, shapes and dtypes (so they concatenate)."""
  if len(batches) < 2:
    return False
  first = jax.tree.structure(batches[0])
  if any(jax.tree.structure(x) != first for x in batches[1:]):
    return False
  leaves = [jax.tree.leaves(x) for x in batches]
  return all(len({(np.shape(a)[1:], jnp.result_type(a)) for a in column}) == 1 for column in zip(*leaves))


def entropy_loss(
    apply_fn: Callable[..., jax.Array],
    variables: PyTree,
    batches: Sequence[PyTree],
    classes: Sequence[jax.Array] | None = None,
) -> jax.Array:
  """sum_t prediction_entropy(apply_fn(variables, batches[t])[..., classes[t]]).

  AdaMerging's objective (FusionBench sums each task's mean entropy). When
  the batches' examples share structure, shapes and dtypes, they go through
  `apply_fn` as one concatenated batch (one forward pass and one entropy to
  trace and differentiate, not one per task: the optimisation compiles
  about as fast for 5 tasks as for 1); a model whose output for an example
  depends on the other examples of its batch (BatchNorm in training mode)
  would see another batch.

  Args:
    apply_fn: (variables, inputs) -> f32[examples, ..., num_logits].
    variables: the merged model.
    batches: one batch of inputs per task (any pytree `apply_fn` takes,
      examples on the leading axis of every array).
    classes: per task, int[c_t] logit columns its entropy is over (the
      task's own classes); None: every column.
  """
  batches = list(batches)
  if not _joinable(batches):
    total = jnp.zeros((), jnp.float32)
    for t, x in enumerate(batches):
      logits = apply_fn(variables, x)
      if classes is not None:
        logits = jnp.take(logits, classes[t], axis=-1)
      total = total + prediction_entropy(logits)
    return total
  # One pass over every example; a task's other columns get a logit of -1e9 (probability 0, and
  # gradient 0: no inf * 0), and each example weighs 1 / its task's examples.
  sizes = np.array([jax.tree.leaves(x)[0].shape[0] for x in batches])
  logits = apply_fn(variables, jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches))
  logits = jnp.asarray(logits, jnp.float32)
  if classes is not None:
    columns = jnp.arange(logits.shape[-1])
    allowed = jnp.stack([jnp.isin(columns, c) for c in classes])[np.repeat(np.arange(len(sizes)), sizes)]
    allowed = allowed.reshape((len(allowed),) + (1,) * (logits.ndim - 2) + (logits.shape[-1],))
    logits = jnp.where(allowed, logits, -1e9)
  weights = np.repeat(1.0 / sizes, sizes).astype(np.float32)
  return jnp.sum(weights * _entropies(logits))


# -- argument checks -----------------------------------------------------------------------------


def _check_granularity(granularity: str, blocks: Blocks | None) -> str:
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
  if granularity == "task" and blocks is not None:
    raise ValueError("blocks group leaves for layer-wise coefficients; pass granularity='layer'")
  return granularity


def _check_steps(name: str, steps: int) -> int:
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
    raise ValueError(f"{name} must be an integer >= 0, got {steps!r}")
  return int(steps)


def _check_positive(name: str, value: float) -> float:
  if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be finite and > 0, got {value!r}")
  return float(value)


def _check_optimizer(optimizer: Optimizer) -> Optimizer:
  if not callable(optimizer):
    raise ValueError(
        f"optimizer must be a callable learning_rate -> optax.GradientTransformation"
        f" (optax.adam, optax.sgd), got {optimizer!r}")
  return optimizer


def _rows(x: PyTree, name: str) -> int:
  """The leading axis every leaf of one input set shares."""
  leaves = jax.tree.leaves(x)
  if not leaves:
    raise ValueError(f"{name}: no arrays")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"{name}: every array needs the same leading (example) axis, got leading sizes"
                     f" {sorted(str(s) for s in sizes)}")
  rows = sizes.pop()
  if rows < 1:
    raise ValueError(f"{name}: no examples")
  return rows


def _check_inputs(
    apply_fn: Callable[..., jax.Array],
    base: PyTree,
    inputs: Sequence[PyTree],
    classes: Sequence[Sequence[int]] | None,
    batch_size: int | None,
    key: jax.Array | None,
) -> tuple[list[PyTree], tuple[jax.Array, ...] | None]:
  """(inputs as a list, classes as int32 arrays or None), after checking them.

  The logits' width comes from `jax.eval_shape` of `apply_fn` on one example,
  which also runs the function's own shape checks before any real work.
  """
  if isinstance(inputs, (np.ndarray, jax.Array)) or not isinstance(inputs, Sequence) or not inputs:
    raise ValueError("inputs: need a non-empty sequence of input sets (one per task, each f32[n, ...]"
                     " or a pytree of such arrays)")
  inputs = list(inputs)
  rows = [_rows(x, f"inputs[{t}]") for t, x in enumerate(inputs)]
  if batch_size is not None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
      raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    for t, n in enumerate(rows):
      if batch_size > n:
        raise ValueError(f"batch_size {batch_size} > {n}, the examples of inputs[{t}]")
    if key is None:
      raise ValueError("batch_size draws random batches: pass a key")
  out = [jax.eval_shape(apply_fn, base, jax.tree.map(lambda a: a[:1], x)) for x in inputs]
  for t, o in enumerate(out):
    if not isinstance(o, jax.ShapeDtypeStruct) or len(o.shape) < 2 or o.shape[0] != 1:
      raise ValueError(f"inputs[{t}]: apply_fn must return one array of logits f32[examples, ..., classes]"
                       f" (one example gave {o})")
  if classes is None:
    return inputs, None
  if isinstance(classes, (str, np.ndarray)) or len(classes) != len(inputs):
    raise ValueError(f"classes: {len(inputs)} input sets but {np.shape(classes)[:1] or classes!r} class lists")
  arrays = []
  for t, (c, o) in enumerate(zip(classes, out)):
    c = np.asarray(c)
    width = o.shape[-1]
    if c.ndim != 1 or c.size == 0 or not np.issubdtype(c.dtype, np.integer) or c.min() < 0 or c.max() >= width:
      raise ValueError(f"classes[{t}] must be a non-empty list of logit columns in [0, {width}), got {c.tolist()}")
    arrays.append(jnp.asarray(c, jnp.int32))
  return inputs, tuple(arrays)


def _leaf_groups(base: PyTree, granularity: str, blocks: Blocks | None) -> tuple[tuple[int, ...], int]:
  """(each leaf's coefficient column, in flattening order; G, the columns).

  Task-wise: every leaf in column 0. Layer-wise without blocks: leaf j in
  column j. With blocks: block l in column l (G = the largest block + 1),
  and the leaves whose block is None together in one more column, the last.
  """
  num_leaves = len(jax.tree.leaves(base))
  if granularity == "task":
    return (0,) * num_leaves, 1
  if blocks is None:
    return tuple(range(num_leaves)), num_leaves
  indices = _leaf_blocks(base, blocks)
  largest = max((i for i in indices if i is not None), default=-1)
  outside = largest + 1
  return tuple(outside if i is None else i for i in indices), outside + (None in indices)


def _initial_coefficients(init: float | Sequence[float], num: int, columns: int) -> jax.Array:
  """f32[T, G]: each model's initial coefficient in every column."""
  per_model = tv._per_model_values(init, num, "init", "initial coefficients")
  return jnp.asarray(np.repeat(per_model[:, None], columns, axis=1))


# -- the jitted parts ----------------------------------------------------------------------------


@jax.jit
def _task_vectors(base: PyTree, models: list[PyTree]) -> PyTree:
  """A tree like base of f32[T, *leaf.shape]: every model's task vector, stacked."""
  return jax.tree.map(lambda b, *xs: tv._leaf_task_vectors(b, xs, None, 1.0), base, *models)


def _merge(
    base: PyTree,
    taus: PyTree,
    coefficients: jax.Array,
    groups: tuple[int, ...],
    masks: PyTree | None,
) -> PyTree:
  """base + mask * sum_t coefficients[t, group] tau_t, leaf by leaf, in the base's dtypes.

  Args:
    base: the pre-trained model.
    taus: `_task_vectors(base, models)`.
    coefficients: f32[T, G].
    groups: each leaf's column of `coefficients`, in flattening order.
    masks: None, or a tree like base of each leaf's multiplier (Concrete's
      rescaled mask), shared by every task.
  """
  flat, treedef = jax.tree.flatten(base)
  tau_leaves = treedef.flatten_up_to(taus)
  mask_leaves = [None] * len(flat) if masks is None else treedef.flatten_up_to(masks)
  merged = []
  for b, tau, g, m in zip(flat, tau_leaves, groups, mask_leaves):
    delta = jnp.sum(tv._per_model(coefficients[:, g].astype(tau.dtype), b.ndim) * tau, axis=0)
    if m is not None:
      delta = m * delta
    merged.append(tv._rebase(b, delta))
  return treedef.unflatten(merged)


def _draw(inputs: Sequence[PyTree], key: jax.Array | None, batch_size: int | None) -> list[PyTree]:
  """Each input set, or `batch_size` of its examples drawn without replacement."""
  if batch_size is None:
    return list(inputs)
  batches = []
  for t, x in enumerate(inputs):
    n = jax.tree.leaves(x)[0].shape[0]
    rows = jax.random.choice(jax.random.fold_in(key, t), n, (batch_size,), replace=False)
    batches.append(jax.tree.map(lambda a: a[rows], x))
  return batches


def _project(coefficients: jax.Array, clip: jax.Array) -> jax.Array:
  """The coefficients, clipped to [0, 1] where `clip` (a traced bool)."""
  return jnp.where(clip, jnp.clip(coefficients, 0.0, 1.0), coefficients)


def _optimise(loss: Callable[[jax.Array, jax.Array], jax.Array], coefficients: jax.Array,
              learning_rate: jax.Array, steps: jax.Array, clip: jax.Array, optimizer: Optimizer) -> jax.Array:
  """(Inside jit) f32[T, G]: the coefficients after `steps` optimiser steps on `loss(c, step)`,
  projected onto [0, 1] after each where `clip`."""
  transform = optimizer(learning_rate)

  def step(i, carry):
    c, state = carry
    updates, state = transform.update(jax.grad(loss)(c, i), state, c)
    return _project(optax.apply_updates(c, updates), clip), state

  coefficients = _project(coefficients, clip)
  coefficients, _ = jax.lax.fori_loop(0, steps, step, (coefficients, transform.init(coefficients)))
  return coefficients


@functools.partial(jax.jit, static_argnames=("apply_fn", "groups", "optimizer", "batch_size"))
def _fit_coefficients(
    base: PyTree,
    taus: PyTree,
    masks: PyTree | None,
    inputs: list[PyTree],
    classes: tuple[jax.Array, ...] | None,
    coefficients: jax.Array,
    learning_rate: jax.Array,
    steps: jax.Array,
    clip: jax.Array,
    key: jax.Array | None,
    *,
    apply_fn: Callable[..., jax.Array],
    groups: tuple[int, ...],
    optimizer: Optimizer,
    batch_size: int | None,
) -> jax.Array:
  """f32[T, G]: the coefficients after `steps` optimiser steps on the entropy loss."""

  def loss(c, i):
    batches = _draw(inputs, None if key is None else jax.random.fold_in(key, i), batch_size)
    return entropy_loss(apply_fn, _merge(base, taus, c, groups, masks), batches, classes)

  return _optimise(loss, coefficients, learning_rate, steps, clip, optimizer)


@functools.partial(jax.jit, static_argnames=("objective", "groups", "optimizer"))
def _fit_to_objective(
    objective: Callable[[PyTree, Any], jax.Array],
    base: PyTree,
    taus: PyTree,
    data: Any,
    coefficients: jax.Array,
    learning_rate: jax.Array,
    steps: jax.Array,
    clip: jax.Array,
    *,
    groups: tuple[int, ...],
    optimizer: Optimizer,
) -> jax.Array:
  """f32[T, G]: the coefficients after `steps` full-batch optimiser steps on `objective(merged, data)`
  (AdaMerging's optimisation on another loss: FW-Soft's, `frank_wolfe`)."""
  return _optimise(lambda c, i: objective(_merge(base, taus, c, groups, None), data),
                   coefficients, learning_rate, steps, clip, optimizer)


class _Fit(NamedTuple):
  """Checked optimisation settings: each leaf's column, initial f32[T, G], steps, rate, clip, optimizer."""

  groups: tuple[int, ...]
  coefficients: jax.Array
  steps: int
  learning_rate: float
  clip: bool
  optimizer: Optimizer


def _check_fit(base: PyTree, num_models: int, *, granularity: str = "task", blocks: Blocks | None = None,
               steps: int = 1000, learning_rate: float = 1e-3, init: float | Sequence[float] = 0.3,
               clip: bool = False, optimizer: Optimizer = optax.adam) -> _Fit:
  """`adamerging`'s optimisation keywords, checked (its defaults), for `num_models` task vectors."""
  granularity = _check_granularity(granularity, blocks)
  steps = _check_steps("steps", steps)
  learning_rate = _check_positive("learning_rate", learning_rate)
  optimizer = _check_optimizer(optimizer)
  groups, columns = _leaf_groups(base, granularity, blocks)
  return _Fit(groups, _initial_coefficients(init, num_models, columns), steps, learning_rate, bool(clip), optimizer)


_merge_jit = jax.jit(_merge, static_argnames="groups")


def _learn(
    apply_fn, base, models, inputs, *, granularity, blocks, steps, learning_rate, init, clip,
    batch_size, classes, key, optimizer, masks=None,
) -> tuple[PyTree, jax.Array, jax.Array, tuple[int, ...]]:
  """Checked-argument core: (merged, coefficients f32[T, G], task vectors, groups)."""
  _check_granularity(granularity, blocks)
  models = tv._check_models(base, models)
  fit = _check_fit(base, len(models), granularity=granularity, blocks=blocks, steps=steps,
                   learning_rate=learning_rate, init=init, clip=clip, optimizer=optimizer)
  inputs, classes = _check_inputs(apply_fn, base, inputs, classes, batch_size, key)
  taus = _task_vectors(base, models)
  coefficients = _fit_coefficients(
      base, taus, masks, inputs, classes, fit.coefficients, jnp.float32(fit.learning_rate), fit.steps, fit.clip,
      None if batch_size is None else key,
      apply_fn=apply_fn, groups=fit.groups, optimizer=fit.optimizer, batch_size=batch_size,
  )
  return _merge_jit(base, taus, coefficients, fit.groups, masks), coefficients, taus, fit.groups


def adamerging(
    apply_fn: Callable[..., jax.Array],
    base: PyTree,
    models: Sequence[PyTree],
    inputs: Sequence[PyTree],
    *,
    granularity: str = "task",
    blocks: Blocks | None = None,
    steps: int = 1000,
    learning_rate: float = 1e-3,
    init: float | Sequence[float] = 0.3,
    clip: bool = False,
    batch_size: int | None = None,
    classes: Sequence[Sequence[int]] | None = None,
    key: jax.Array | None = None,
    optimizer: Optimizer = optax.adam,
) -> tuple[PyTree, jax.Array]:
  """AdaMerging (Yang et al., ICLR 2024): see the module docstring.

  Args:
    apply_fn: (variables, inputs) -> logits f32[..., num_logits] (bind
      `train=False` with a closure or `functools.partial`). It is a static
      argument of the jitted optimisation: pass the same function object
      to reuse the compilation.
    base: the pre-trained model.
    models: T >= 1 models fine-tuned from it (same structure and shapes).
    inputs: unlabelled inputs, one set per task (any number >= 1 of sets),
      each an array f32[n_t, ...] or a pytree of arrays with the examples on
      their leading axis; never the test inputs a score is reported on.
    granularity: "task" (one coefficient per model) or "layer" (one per
      model and group of leaves).
    blocks: with "layer", leaf path (`a/b/c`) -> block index l >= 0 or None,
      a mapping naming every leaf or a callable (`blocks_in_read_order`
      gives one); None: every leaf its own group (FusionBench's one
      coefficient per parameter tensor).
    steps: optimiser steps (FusionBench: 1000).
    learning_rate: the optimiser's learning rate (FusionBench: Adam, 1e-3).
    init: every coefficient's starting value, or one per model (0.3).
    clip: project the coefficients onto [0, 1] after every step.
    batch_size: examples drawn (without replacement, anew each step) from
      every input set per step; None: all of them every step (deterministic).
    classes: per input set, the logit columns its entropy is over (a task's
      own classes on a shared head); None: all.
    key: the random key of the batches (needed with `batch_size`).
    optimizer: learning_rate -> optax.GradientTransformation, called inside
      jit with a traced learning rate.

  Returns:
    `(merged, coefficients)`: the merged model (the base's leaf dtypes) and
    the learned coefficients, f32[T] task-wise, f32[T, G] layer-wise. Leaf j
    of model t is scaled by `coefficients[t, g_j]`: g_j = j (the flattening
    order) without blocks, else its block, and the leaves whose block is None
    share the last column.

  Raises:
    ValueError (before any optimisation): no model, a model that does not
    match the base (naming the leaf path), an unknown granularity, blocks
    with task granularity or naming a leaf wrongly, steps not an integer >= 0,
    a learning rate not finite and > 0, an init not finite or not one per
    model, no inputs or an input set without examples, a batch size larger
    than an input set or without a key, classes not one valid list per input
    set, an `apply_fn` that does not return one array of logits, or an
    optimizer that is not callable.
  """
  merged, coefficients, _, _ = _learn(
      apply_fn, base, models, inputs, granularity=granularity, blocks=blocks, steps=steps,
      learning_rate=learning_rate, init=init, clip=clip, batch_size=batch_size, classes=classes,
      key=key, optimizer=optimizer)
  return merged, coefficients[:, 0] if granularity == "task" else coefficients

