"""The diagonal Fisher information of a classifier, from per-example gradients.

    logits_fn = lambda v, x: model.apply(v, x, train=False)  # BatchNorm in eval mode
    F = mj.fisher(logits_fn, variables, batches, kind="exact")
    batch_fisher = jax.jit(mj.fisher_transform(logits_fn, kind="empirical"))
    F_batch = batch_fisher(variables, (x, y))

For a classifier `p(y | x) = softmax(logits_fn(variables, x))` and examples
`x_1 .. x_N`, the diagonal Fisher is the per-example mean

    F = 1/N sum_n sum_y q_n(y) g_ny^2,    g_ny = d log p(y | x_n) / d params,

squared entry by entry, where the kind chooses `q_n` (DESIGN.md, Other
definitions):

  "exact"      q_n = p(. | x_n): every class, weighted by the model (Matena &
               Raffel, "Merging Models with Fisher-Weighted Averaging").
  "empirical"  all mass on the batch's label y_n; batches are `(x, y)` pairs.
  "sampled"    all mass on one y_n ~ p(. | x_n), drawn as
               `jax.random.categorical(jax.random.fold_in(key, n), log p(. | x_n))`
               with n the example's index in the pass (0, 1, ... over all
               batches), so the draw depends on neither batching nor sharding.

Each example takes one forward pass and one `jax.vjp`, vmapped over
`example_chunk` examples at a time with a `lax.scan` over the chunks of a
batch; the exact Fisher then pulls back its classes together, in chunks of
`class_chunk` (another scan). There is no Python loop over examples or
classes. Kernels are not differentiated per example: probes at their outputs
(`trace.probed_kernel_uses`) give each example's output cotangent `delta`,
and

  a Dense kernel on one row per example (per-example gradient `x (x) delta`)
      sums to one matrix product `(x^2)^T (sum_y q(y) delta_y^2)` over the
      batch, with no per-example gradient at all;
  a convolution kernel without feature groups gets `patches^T delta`, a
      matrix product batched over examples and classes;

every other leaf (biases, norms, kernels used twice or read elsewhere) gets
its per-example gradient from the VJP. By default (`example_chunk=None`) a
chunk holds as many examples as keep these per-example terms under 4 MiB on
CPU (larger working sets leave the caches) and under 1 GiB elsewhere
(experiments/benchmarks/RESULTS.md has the speed against a per-example
loop).

A language model's per-token logits `f32[batch, positions..., classes]` are
accepted as they are: each position is a term of its example's Fisher,
weighted 1/positions (the per-token mean), with "empirical" labels
`int[batch, positions...]` (the next tokens) and "sampled" drawing one token
per position (DESIGN.md, Fisher: "sampled" is the kind to use for an LM).

`logits_fn` must run BatchNorm in eval mode (running statistics, `train=False`
bound by the caller): in training mode an example's output would depend on the
rest of its batch, and a per-example gradient would be meaningless. Where the
variables are a mapping with a `params` collection (Flax), only `params` is
differentiated and every other leaf (BatchNorm running statistics) gets
Fisher 0; otherwise every leaf is differentiated.
"""

from collections.abc import Callable, Iterable, Mapping
import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import distributed
from mergejax import stats
from mergejax import trace
from mergejax import tree

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]
KINDS = ("exact", "empirical", "sampled")


def _check_options(kind: str, class_chunk: int, example_chunk: int | None) -> None:
  if kind not in KINDS:
    raise ValueError(f"fisher: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
  _check_positive_int("class_chunk", class_chunk)
  if example_chunk is not None:
    _check_positive_int("example_chunk", example_chunk)


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"fisher: {name} must be a positive int, got {value!r}")


def _check_key(kind: str, key: jax.Array | None) -> None:
  if kind == "sampled" and key is None:
    raise ValueError("fisher: kind='sampled' draws labels from the model and needs a key")


def _check_shapes(logits_fn: LogitsFn, variables: PyTree, x: Any, labels: Any | None) -> int:
  """The number of classes, once `logits_fn(variables, x)` is f32[batch, classes].

  Raises:
    ValueError: for logits of another shape (or several outputs), or labels
      that are not one integer per example.
  """
  out = jax.eval_shape(logits_fn, variables, x)
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise ValueError(
        "fisher: logits_fn must return one array f32[batch, classes] (or f32[batch, positions..., classes]),"
        f" got {jax.tree.structure(out)} (a multi-head model: bind one head in logits_fn)")
  if out.ndim < 2 or out.shape[0] != x.shape[0]:
    raise ValueError(
        f"fisher: logits_fn must return f32[batch, classes] or f32[batch, positions..., classes]; on inputs"
        f" of shape {tuple(x.shape)} it returned shape {tuple(out.shape)}")
  if labels is not None and (tuple(labels.shape) != tuple(out.shape[:-1])
                             or not jnp.issubdtype(labels.dtype, jnp.integer)):
    raise ValueError(
        f"fisher: labels must be int{list(out.shape[:-1])}, one per example (and position), got"
        f" {labels.dtype}{list(labels.shape)}")
  return out.shape[-1]


def _differentiated(variables: PyTree) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
  """(the leaves to differentiate, a function putting them back into variables)."""
  if isinstance(variables, Mapping) and "params" in variables:
    return variables["params"], lambda params: {**variables, "params": params}
  return variables, lambda params: params


def _full_tree(variables: PyTree, params_fisher: PyTree) -> PyTree:
  """A tree shaped like `variables`: `params_fisher` where differentiated, else 0."""
  if not (isinstance(variables, Mapping) and "params" in variables):
    return params_fisher
  zeros = jax.tree.map(lambda v: jnp.zeros(jnp.shape(v), jnp.float32), variables)
  updates = {("params", *path): f for path, f in tree.leaves_by_path(params_fisher).items()}
  return tree.replace_leaves(zeros, updates)


def _weighted_squares(pullback, classes: jax.Array, weights: jax.Array, num_classes: int,
                      class_chunk: int, squares: Callable[[Any], PyTree]) -> PyTree:
  """sum_k weights[k] squares(pullback of e_{classes[k]}): one example's Fisher terms.

  Args:
    pullback: the VJP of one example's log-probabilities f32[num_classes].
    classes: i32[k], the classes whose gradients count.
    weights: f32[k], their weights.
    num_classes: the length of the log-probabilities.
    class_chunk: classes pulled back together; more than that take a scan.
    squares: one class's cotangents -> the tree of its squared terms.
  """

  def chunk_sum(chunk_classes, chunk_weights):
    terms = jax.vmap(lambda c: squares(pullback(jax.nn.one_hot(c, num_classes, dtype=jnp.float32))))(
        chunk_classes)
    return jax.tree.map(
        lambda t: jnp.tensordot(chunk_weights, t, axes=1, precision=_HIGHEST), terms)

  k = classes.shape[0]
  if k <= class_chunk:
    return chunk_sum(classes, weights)
  steps = -(-k // class_chunk)
  pad = steps * class_chunk - k  # padding classes weigh 0
  classes = jnp.pad(classes, (0, pad)).reshape(steps, class_chunk)
  weights = jnp.pad(weights, (0, pad)).reshape(steps, class_chunk)
  zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(chunk_sum, classes[0], weights[0]))
  total, _ = jax.lax.scan(
      lambda acc, cw: (jax.tree.map(jnp.add, acc, chunk_sum(*cw)), None), zero, (classes, weights))
  return total


class _OuterKernel(NamedTuple):
  """A Dense kernel on one row per example: its per-example gradient is `x (x) delta`.

  A `dot_general` without batch dimensions whose input has a single row per
  example: the squared per-example gradient is `x^2 (x) delta^2`, so the
  Fisher sums to one matrix product `(x^2)^T (sum_y q(y) delta_y^2)` over the
  examples and never holds a per-example gradient.

  Attributes:
    path: the kernel's path in the variables.
    shape: the kernel's shape.
    output_shape: one example's output shape (its probe's).
    input_axes: the input's axes, those the kernel contracts first (in the
      kernel's order), then the others (all of size 1).
    output_axes: the output's axes, the kernel's free axes first, then the
      others (all of size 1).
    layout: the kernel's axes in the order (contracted..., free...).
    contracted: the number of the kernel's contracted axes.
  """

  path: tuple[str, ...]
  shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  input_axes: tuple[int, ...]
  output_axes: tuple[int, ...]
  layout: tuple[int, ...]
  contracted: int

  def _sizes(self) -> tuple[int, int]:
    inner = math.prod(self.shape[a] for a in self.layout[:self.contracted])
    return inner, math.prod(self.shape) // inner

  def floats(self, pulled: int) -> int:
    """Floats held per example while `pulled` classes are pulled back."""
    return self._sizes()[0] + pulled * self._sizes()[1]

  def class_term(self, x: jax.Array, delta: jax.Array) -> jax.Array:
    del x
    return jnp.square(jnp.transpose(delta, self.output_axes).astype(jnp.float32)).ravel()

  def example_term(self, x: jax.Array, class_sum: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.square(jnp.transpose(x, self.input_axes).astype(jnp.float32)).ravel(), class_sum

  def zero(self) -> jax.Array:
    return jnp.zeros(self._sizes(), jnp.float32)

  def chunk_sum(self, weight: jax.Array, terms: tuple[jax.Array, jax.Array]) -> jax.Array:
    x_sq, delta_sq = terms  # f32[chunk, inner], f32[chunk, outer]
    return jnp.dot((x_sq * weight[:, None]).T, delta_sq, precision=_HIGHEST)

  def kernel(self, total: jax.Array) -> jax.Array:
    laid_out = total.reshape([self.shape[a] for a in self.layout])
    return jnp.transpose(laid_out, np.argsort(self.layout))


class _PatchKernel(NamedTuple):
  """A convolution kernel (no feature groups): per-example gradient `patches^T delta`.

  Each example's gradient is a matrix product of its input patches and its
  output cotangent, batched over examples and classes: never the grouped
  convolution that vmapping a convolution's kernel gradient over examples
  becomes.

  Attributes:
    path: the kernel's path in the variables.
    shape: the kernel's shape.
    output_shape: one example's output shape (its probe's).
    conv: the convolution's window_strides, padding, lhs_dilation and
      rhs_dilation.
    specs: its dimension numbers (lhs_spec, rhs_spec, out_spec), as axis
      indices.
  """

  path: tuple[str, ...]
  shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  conv: tuple[tuple[Any, ...], ...]
  specs: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

  def floats(self, pulled: int) -> int:
    """Floats held per example while `pulled` classes are pulled back."""
    out = self.shape[self.specs[1][0]]
    window = math.prod(self.shape) // out  # input features x window
    return pulled * math.prod(self.shape) + window * math.prod(self.output_shape) // out

  def class_term(self, x: jax.Array, delta: jax.Array) -> jax.Array:
    lhs_spec, rhs_spec, out_spec = self.specs
    strides, padding, lhs_dilation, rhs_dilation = self.conv
    patches = jax.lax.conv_general_dilated_patches(  # f32[1, C * window, positions...]
        jnp.transpose(x, lhs_spec).astype(jnp.float32), [self.shape[a] for a in rhs_spec[2:]],
        strides, padding, lhs_dilation, rhs_dilation, precision=_HIGHEST)
    patches = patches.reshape(patches.shape[1], -1)
    delta = jnp.transpose(delta, out_spec).astype(jnp.float32)
    grad = jnp.dot(patches, delta.reshape(delta.shape[1], -1).T, precision=_HIGHEST)
    return jnp.square(grad)  # f32[C * window, O]

  def example_term(self, x: jax.Array, class_sum: jax.Array) -> jax.Array:
    del x
    return class_sum

  def zero(self) -> jax.Array:
    out = self.shape[self.specs[1][0]]
    return jnp.zeros((math.prod(self.shape) // out, out), jnp.float32)

  def chunk_sum(self, weight: jax.Array, terms: jax.Array) -> jax.Array:
    return jnp.tensordot(weight, terms, axes=1, precision=_HIGHEST)

  def kernel(self, total: jax.Array) -> jax.Array:
    rhs_spec = self.specs[1]
    # Rows run over (input feature, window...) in rhs_spec order: kernel axes
    # rhs_spec[1], rhs_spec[2:], then the output feature rhs_spec[0].
    laid_out = total.reshape([self.shape[a] for a in (*rhs_spec[1:], rhs_spec[0])])
    return jnp.transpose(laid_out, np.argsort((*rhs_spec[1:], rhs_spec[0])))


# Both forms answer: `class_term(x, delta)`, one class's squared term from the
# kernel's input and output cotangent (one example); `example_term(x,
# class_sum)`, the example's term from the weighted sum over classes;
# `chunk_sum(weight, terms)`, the weighted sum of a chunk's terms; `zero()` and
# `kernel(total)`, the accumulator and the kernel-shaped Fisher it holds;
# `floats(pulled)`, the memory per example.
_ProbedKernel = _OuterKernel | _PatchKernel


def _probed_kernels(logits_fn: LogitsFn, variables: PyTree, x_one: jax.Array,
                    shapes: Mapping[tuple[str, ...], tuple[int, ...]]
                    ) -> tuple[tuple[_ProbedKernel, ...], jax.ShapeDtypeStruct]:
  """The kernels among `shapes` (path -> shape) whose squared gradients factorise.

  A kernel qualifies when it is used once and read nowhere else, by a
  `dot_general` on one row per example (`_OuterKernel`) or by a convolution
  without feature or batch groups (`_PatchKernel`).

  Returns:
    The kernels, and the shape of `logits_fn(variables, x_one)` (one trace).
  """
  found = []

  def run(v, x):
    out, uses, other_reads = trace.probed_kernel_uses(logits_fn)(v, {}, x)
    for path, path_uses in uses.items():
      if path not in shapes or path in other_reads or len(path_uses) != 1:
        continue
      use, = path_uses
      kernel = _outer_kernel(path, shapes[path], use) or _patch_kernel(path, shapes[path], use)
      if kernel is not None:
        found.append(kernel)
    return out

  out = jax.eval_shape(run, variables, x_one)
  return tuple(found), out


def _outer_kernel(path, shape, use: trace.KernelUse) -> _OuterKernel | None:
  if use.primitive != "dot_general" or use.params["dimension_numbers"][1][0]:
    return None
  contracted = [a for a, _ in use.input_axes]
  rest_in = [a for a in range(use.input.ndim) if a not in contracted]
  if any(use.input.shape[a] != 1 for a in rest_in):
    return None
  produced = [a for a, _ in use.output_axes]
  rest_out = [a for a in range(use.output.ndim) if a not in produced]
  layout = tuple(k for _, k in use.input_axes) + tuple(k for _, k in use.output_axes)
  return _OuterKernel(path, tuple(shape), tuple(use.output.shape), tuple(contracted + rest_in),
                      tuple(produced + rest_out), layout, len(contracted))


def _patch_kernel(path, shape, use: trace.KernelUse) -> _PatchKernel | None:
  p = use.params
  if (use.primitive != "conv_general_dilated" or p["feature_group_count"] != 1
      or p["batch_group_count"] != 1):
    return None
  dn = p["dimension_numbers"]
  conv = (tuple(p["window_strides"]), tuple(map(tuple, p["padding"])), tuple(p["lhs_dilation"]),
          tuple(p["rhs_dilation"]))
  return _PatchKernel(path, tuple(shape), tuple(use.output.shape), conv,
                      (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)))


def _batch_sum(logits_fn: LogitsFn, kind: str, class_chunk: int, example_chunk: int | None,
               key: jax.Array | None, variables: PyTree, x: jax.Array, labels: jax.Array, index: jax.Array,
               mask: jax.Array) -> PyTree:
  """sum over the batch's real examples of each one's Fisher, shaped like `variables`.

  Kernels whose squared gradients factorise (`_probed_kernels`) are summed
  from their inputs and the cotangents at their outputs (probes); every other
  differentiated leaf from its per-example gradient.

  Args:
    x: f32[batch, ...], the inputs.
    labels: i32[batch] (read by "empirical" only).
    index: i32[batch], each example's index in the pass (read by "sampled").
    mask: bool[batch], the real examples.
  """
  params, rebuild = _differentiated(variables)
  prefix = ("params",) if params is not variables else ()
  by_path = tree.leaves_by_path(params)
  kernels, logits = _probed_kernels(logits_fn, variables, x[:1],
                                    {prefix + p: jnp.shape(v) for p, v in by_path.items()})
  probed = {k.path[len(prefix):] for k in kernels}
  free = {p: v for p, v in by_path.items() if p not in probed}
  apply = trace.probed_kernel_uses(logits_fn)

  # Per-token logits f32[batch, positions..., V] (a language model): every position is a term of
  # the example's Fisher, weighted 1/positions (the per-token mean; DESIGN.md, Fisher).
  positions, vocab = math.prod(logits.shape[1:-1]), logits.shape[-1]

  def log_probs(free_leaves, probes, x_n):
    v = rebuild(tree.replace_leaves(params, free_leaves))
    logits, uses, _ = apply(v, {k.path: [probes[k.path]] for k in kernels}, x_n[None])
    inputs = {k.path: uses[k.path][0].input for k in kernels}
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[0]).reshape(-1), inputs

  def example(x_n, label, i):
    probes = {k.path: jnp.zeros(k.output_shape, jnp.float32) for k in kernels}
    log_p, pullback, inputs = jax.vjp(lambda f, pr: log_probs(f, pr, x_n), free, probes,
                                      has_aux=True)
    log_p = jax.lax.stop_gradient(log_p)  # f32[positions * V], position-major
    num_classes = log_p.shape[0]
    if kind == "exact":
      classes, weights = jnp.arange(num_classes), jnp.exp(log_p) / positions
    else:
      rows = log_p.reshape(logits.shape[1:])  # f32[V] for a classifier, as before
      y = label if kind == "empirical" else jax.random.categorical(jax.random.fold_in(key, i), rows)
      classes = jnp.arange(positions) * vocab + jnp.reshape(y, (positions,))
      weights = jnp.full(positions, 1.0 / positions, jnp.float32)

    def squares(cotangents):
      grads, deltas = cotangents
      return (jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads),
              {k.path: k.class_term(inputs[k.path], deltas[k.path]) for k in kernels})

    free_sq, class_sums = _weighted_squares(pullback, classes, weights, num_classes, class_chunk,
                                            squares)
    return free_sq, {k.path: k.example_term(inputs[k.path], class_sums[k.path]) for k in kernels}

  def chunk_sum(acc, chunk):
    x_c, labels_c, index_c, mask_c = chunk
    free_sq, terms = jax.vmap(example)(x_c, labels_c, index_c)
    weight = mask_c.astype(jnp.float32)
    # A dot over the examples: XLA:CPU reduces a leading axis far slower.
    free_acc = jax.tree.map(
        lambda a, f: a + jnp.tensordot(
            weight, jnp.where(mask_c.reshape(-1, *[1] * (f.ndim - 1)), f, 0.0),
            axes=1, precision=_HIGHEST),
        acc[0], free_sq)
    kernel_acc = {k.path: acc[1][k.path] + k.chunk_sum(weight, terms[k.path]) for k in kernels}
    return (free_acc, kernel_acc), None

  n = x.shape[0]
  pulled = min(class_chunk, positions * vocab if kind == "exact" else positions)
  size = _chunk_size(example_chunk, n, free, kernels, pulled)
  steps = -(-n // size)
  pad = steps * size - n  # padding repeats the last example, masked out

  def chunks(a):
    a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) if pad else a
    return a.reshape(steps, size, *a.shape[1:])

  zero = (jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), free),
          {k.path: k.zero() for k in kernels})
  mask = jnp.concatenate([mask, jnp.zeros(pad, bool)]) if pad else mask
  (free_sums, kernel_sums), _ = jax.lax.scan(
      chunk_sum, zero, (chunks(x), chunks(labels), chunks(index), mask.reshape(steps, size)))
  kernel_sums = {k.path[len(prefix):]: k.kernel(kernel_sums[k.path]) for k in kernels}
  return _full_tree(variables, tree.replace_leaves(params, {**free_sums, **kernel_sums}))


# The default example chunk: per-example terms of at most this many floats at once.
_CHUNK_FLOATS_CPU = 2**20
_CHUNK_FLOATS = 2**28


def _chunk_size(example_chunk: int | None, batch: int, free: PyTree,
                kernels: tuple[_ProbedKernel, ...], pulled: int) -> int:
  """Examples whose gradients are vmapped together (the batch is scanned in chunks).

  None picks as many as keep a chunk's per-example terms (the gradients of the
  leaves not probed and the probed kernels' terms, for the `pulled` classes
  pulled back together) under 2^20 floats (4 MiB) on CPU, where larger
  working sets leave the caches, and under 2^28 (1 GiB) elsewhere.
  """
  if example_chunk is None:
    per_example = pulled * sum(math.prod(jnp.shape(p)) for p in jax.tree.leaves(free))
    per_example += sum(k.floats(pulled) for k in kernels)
    limit = _CHUNK_FLOATS_CPU if jax.default_backend() == "cpu" else _CHUNK_FLOATS
    example_chunk = max(1, limit // max(1, per_example))
  return max(1, min(example_chunk, batch))


def _split_batch(batch: Any, kind: str) -> tuple[Any, Any | None]:
  """(x, labels) of a batch; labels are None unless kind is "empirical"."""
  pair = isinstance(batch, (tuple, list))
  if kind != "empirical":
    return (batch[0] if pair else batch), None
  if not (pair and len(batch) >= 2):
    raise ValueError(
        "fisher: kind='empirical' needs labels: batches must be (x, y) pairs, got a"
        f" {type(batch).__name__}")
  return batch[0], batch[1]


def fisher_transform(logits_fn: LogitsFn, *, kind: str = "exact",
                     class_chunk: int = 16, example_chunk: int | None = None) -> Callable[..., PyTree]:
  """The mean Fisher of one batch, as a function to jit (like `jax.grad`).

      batch_fisher = jax.jit(fisher_transform(logits_fn, kind="sampled"))
      F = batch_fisher(variables, x, key)

  Args:
    logits_fn: `(variables, x: f32[batch, ...]) -> f32[batch, classes]`,
      BatchNorm in eval mode (module docstring).
    kind: "exact", "empirical" or "sampled".
    class_chunk: classes pulled back together by the exact Fisher.
    example_chunk: examples whose gradients are vmapped together; a batch is
      scanned in chunks of this many (None: module docstring).

  Returns:
    `batch_fisher(variables, batch, key=None) -> PyTree`, the per-example mean
    Fisher of `batch` (an array x, or an `(x, y)` pair; "empirical" needs y:
    i32[batch]), float32 and shaped like `variables`. "sampled" needs `key`;
    example n of the batch draws with `fold_in(key, n)`.

  Raises:
    ValueError: at once for an unknown kind; when called (traced), for a
      missing key or labels, or logits or labels of the wrong shape.
  """
  _check_options(kind, class_chunk, example_chunk)

  def batch_fisher(variables: PyTree, batch: Any, key: jax.Array | None = None) -> PyTree:
    _check_key(kind, key)
    x, labels = _split_batch(batch, kind)
    x = jnp.asarray(x)
    _check_shapes(logits_fn, variables, x, labels)
    n = x.shape[0]
    labels = jnp.zeros(n, jnp.int32) if labels is None else jnp.asarray(labels)
    sums = _batch_sum(logits_fn, kind, class_chunk, example_chunk, key, variables, x, labels,
                      jnp.arange(n), jnp.ones(n, bool))
    return jax.tree.map(lambda s: s / n, sums)

  return batch_fisher


def fisher_accumulator(logits_fn: LogitsFn, *, kind: str = "exact", key: jax.Array | None = None,
                       class_chunk: int = 16, example_chunk: int | None = None) -> stats.Accumulator:
  """The Fisher as a streaming statistic, for `stats.accumulate` or a user's loop.

  The state is `(count: i32[], sums, key)`: the real examples seen, the sum of
  their Fishers, and the key of "sampled" (None for the other kinds).
  `update(state, variables, x, mask, axis_name=None)` adds a (padded) batch;
  with `axis_name` (a mapped axis, or a tuple of them) it `psum`s over that
  axis and numbers the real examples (mask True) consecutively in the order
  of the global batch laid out along it (device i holds rows `i * batch`
  onwards, as `shard_map` and `pmap` split it), padded rows skipped wherever
  they are, so "sampled" draws the same labels however the batch is split or
  padded (also the per-process padding of a multi-process pass).
  "empirical" reads labels: its `x` is the pair
  `(x, y)` (`labels=True`). `finalize` gives `sums / count`.

  `update` and `finalize` are the same functions for the same `logits_fn`,
  kind and chunks (the key lives in the state), so `stats.accumulate`
  compiles one pass for all the models a user computes Fishers of.

  Args:
    logits_fn: `(variables, x: f32[batch, ...]) -> f32[batch, classes]`,
      BatchNorm in eval mode (module docstring).
    kind: "exact", "empirical" or "sampled".
    key: the PRNG key of "sampled" (ignored by the others).
    class_chunk: classes pulled back together by the exact Fisher.
    example_chunk: examples whose gradients are vmapped together; a batch is
      scanned in chunks of this many (None: module docstring).

  Raises:
    ValueError: at once for an unknown kind or "sampled" without a key; in
      `init`, for logits or labels of the wrong shape.
  """
  _check_options(kind, class_chunk, example_chunk)
  _check_key(kind, key)
  update, finalize = _fisher_update(logits_fn, kind, class_chunk, example_chunk)
  labels = kind == "empirical"

  def init(variables, batch):
    x, y = batch if labels else (batch, None)
    _check_shapes(logits_fn, variables, x, y)
    params, _ = _differentiated(variables)
    zero = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return jnp.zeros((), jnp.int32), _full_tree(variables, zero), key if kind == "sampled" else None

  return stats.Accumulator(init, update, finalize, labels=labels)


@functools.lru_cache(maxsize=32)
def _fisher_update(logits_fn: LogitsFn, kind: str, class_chunk: int,
                   example_chunk: int | None) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """`fisher_accumulator`'s update and finalize, made once per options."""

  def update(state, variables, batch, mask, axis_name=None):
    count, sums, key = state
    x, y = batch if kind == "empirical" else (batch, None)
    size = x.shape[0]
    seen = mask.sum(dtype=jnp.int32)
    # Real rows are numbered consecutively in the order of the global batch
    # (device by device along axis_name), skipping padded rows wherever they are.
    before = count if axis_name is None else count + _real_rows_before(seen, axis_name)
    y = jnp.zeros(size, jnp.int32) if y is None else y  # read by "empirical" only
    batch_sums = _batch_sum(logits_fn, kind, class_chunk, example_chunk, key, variables, x, y,
                            before + jnp.cumsum(mask, dtype=jnp.int32) - 1, mask)
    if axis_name is not None:
      seen, batch_sums = jax.lax.psum((seen, batch_sums), axis_name)
    return count + seen, jax.tree.map(jnp.add, sums, batch_sums), key

  def finalize(state):
    count, sums, _ = state
    return jax.tree.map(lambda s: s / jnp.maximum(count, 1), sums)

  return update, finalize


def _real_rows_before(seen: jax.Array, axis_name: Any) -> jax.Array:
  """The real rows on the devices before this one along `axis_name` (a name or a tuple)."""
  counts = jax.lax.all_gather(seen, axis_name)
  return jnp.where(jnp.arange(counts.shape[0]) < jax.lax.axis_index(axis_name), counts, 0).sum()


def _check_first_batch(logits_fn: LogitsFn, variables: PyTree, batch: Any, kind: str) -> None:
  """Shapes, finite logits and labels in range, on the first batch."""
  x, labels = _split_batch(batch, kind)
  x = np.asarray(x)
  labels = None if labels is None else np.asarray(labels)
  num_classes = _check_shapes(logits_fn, variables, x, labels)
  logits = np.asarray(jax.jit(logits_fn)(variables, x))
  bad = int((~np.isfinite(logits)).sum())
  if bad:
    raise ValueError(f"fisher: logits_fn gave {bad} non-finite logits (of {logits.size}) on the first batch")
  if labels is not None and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"fisher: labels must lie in [0, {num_classes}); the first batch has"
        f" {labels.min()}..{labels.max()}")


def fisher(
    logits_fn: LogitsFn,
    variables: PyTree,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    kind: str = "exact",
    key: jax.Array | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    class_chunk: int = 16,
    example_chunk: int | None = None,
) -> PyTree:
  """The diagonal Fisher over a data pass, sharded like every statistic.

      model = mj.models.build("resnet20", num_classes=10)
      logits_fn = lambda v, x: model.apply(v, x, train=False)  # running statistics
      F = mj.fisher(logits_fn, variables, batches, kind="exact")
      F["batch_stats"]  # all 0: only params are differentiated

  Args:
    logits_fn: `(variables, x: f32[batch, ...]) -> f32[batch, classes]`, with
      BatchNorm in eval mode (bind `train=False` in a closure).
    variables: the model's variables (Flax: `params` is differentiated,
      other collections get 0).
    batches: inputs, or `(x, y)` pairs ("empirical" needs them), or a
      callable returning a fresh iterable (DESIGN.md, batches); ragged
      batches are padded and masked.
    kind: "exact", "empirical" or "sampled" (module docstring).
    key: the PRNG key of "sampled": the same key gives the same Fisher on any
      batching and any number of devices.
    mesh: the devices each batch is split over (`stats.accumulate`); default
      every device of every process: under `jax.distributed` each process
      passes its own batches and gets the Fisher of all of them.
    progress: log batches/s at most every 10 s.
    class_chunk: classes pulled back together by the exact Fisher.
    example_chunk: examples whose gradients are vmapped together (memory
      at most about example_chunk * class_chunk * num_params floats per
      device); None: as many as fit in 4 MiB on CPU, 1 GiB elsewhere.

  Returns:
    The per-example mean Fisher, float32, shaped like `variables`.

  Raises:
    ValueError: before the pass, for an unknown kind, "sampled" without a key,
      non-finite variables, no batches, a first batch without labels for
      "empirical", logits that are not f32[batch, classes] or not finite on
      the first batch, or labels of the first batch out of range; during it,
      for a batch of another shape (`stats.accumulate`). Over several
      processes a check that fails on one raises on every one; a process
      with no batches contributes none (an error only when none has any).
  """
  stat = fisher_accumulator(logits_fn, kind=kind, key=key, class_chunk=class_chunk,
                            example_chunk=example_chunk)
  tree.check_finite(variables, "fisher: variables")
  mesh = distributed.default_mesh() if mesh is None else mesh
  it = iter(batches() if callable(batches) else batches)
  first, error = next(it, None), None
  try:
    if first is None and not distributed.is_global(mesh):  # on a global mesh: `accumulate` checks
      raise ValueError("fisher: batches is empty")
    if first is not None:
      _check_first_batch(logits_fn, variables, first, kind)
  except ValueError as e:  # each process checks its own first batch: all raise together
    error = e
  distributed.raise_together(mesh, error, "fisher")
  return stats.accumulate(stat, variables, itertools.chain([] if first is None else [first], it), mesh=mesh,
                          progress=progress)
