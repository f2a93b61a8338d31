r"""Per-example Fisher: mergejax's vmap against a Python loop over examples.

    python -m experiments.benchmarks.fisher --examples=512 --batch=128

For each model (an MLP and ResNet-20 from `mergejax.models`, randomly
initialised, on scikit-learn's 8x8 digits from `mergejax.data`) and each kind
("exact", "empirical"), the diagonal Fisher of the first `--examples`
training images, three ways:

  loop: a Python loop over the examples calling one jitted function per
    example: `jax.grad` of log p(y | x) for the label ("empirical"), or for
    every class (`jax.vmap` of `jax.grad` over the classes, weighted by p,
    "exact"); contributions are summed on the device and divided by N.
  transform: `jax.jit(mj.fisher_transform(...))` over batches of `--batch`,
    summed (weighted by batch size) and divided by N.
  mj.fisher: the whole pass through `stats.accumulate`, sharded over the local
    devices; timed on a second call, which reuses the first call's compiled
    pass (its "compile" is the first call's extra time).

The loop and the transform are compiled on one example or batch first, then
timed over the pass with `block_until_ready`. "x loop" is the loop's time over
the method's; "max |diff|" is the largest absolute difference from the loop's
Fisher, and "rel" that over the largest Fisher entry.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj

_EXAMPLES = flags.DEFINE_integer("examples", 512, "Training images in the pass.")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per batch of the vmapped Fisher.")
_MLP_FEATURES = flags.DEFINE_list("mlp_features", ["512", "512"], "The MLP's hidden widths.")
_RESNET_WIDTH = flags.DEFINE_integer("resnet_width_multiplier", 1, "ResNet-20's width multiplier.")


def _timed(step, total, args):
  """(compile seconds, pass seconds, sum): `total = step(total, *a)` for a in args.

  The first call compiles `step` for every argument shape; the pass is then
  timed alone, on the same arguments.
  """
  start = time.perf_counter()
  for shape in {jax.tree.map(np.shape, a): a for a in args}.values():
    jax.block_until_ready(step(total, *shape))
  compiled = time.perf_counter()
  for a in args:
    total = step(total, *a)
  jax.block_until_ready(total)
  return compiled - start, time.perf_counter() - compiled, total


def _per_example_loop(logits_fn, variables, x, y, kind):
  """The Fisher by a Python loop over examples, one jitted call each."""

  def log_probs(params, example):
    return jax.nn.log_softmax(logits_fn({**variables, "params": params}, example[None])[0])

  @jax.jit
  def step(total, example, label):
    params = variables["params"]
    if kind == "empirical":
      squares = jax.tree.map(jnp.square, jax.grad(lambda p: log_probs(p, example)[label])(params))
    else:
      p = jnp.exp(log_probs(params, example))
      grads = jax.vmap(jax.grad(lambda q, c: log_probs(q, example)[c]), in_axes=(None, 0))(
          params, jnp.arange(p.shape[0]))
      squares = jax.tree.map(lambda g: jnp.einsum("c,c...->...", p, jnp.square(g)), grads)
    return jax.tree.map(jnp.add, total, squares)

  zero = jax.tree.map(jnp.zeros_like, variables["params"])
  compile_s, seconds, total = _timed(step, zero, list(zip(x, y)))
  return compile_s, seconds, jax.tree.map(lambda t: t / len(x), total)


def _transform(logits_fn, variables, x, y, kind, batch):
  """The Fisher by the jitted transform over batches, weighted by their sizes."""
  batch_fisher = mj.fisher_transform(logits_fn, kind=kind)

  @jax.jit
  def step(total, xb, yb):
    fisher = batch_fisher(variables, (xb, yb))["params"]
    return jax.tree.map(lambda t, f: t + f * xb.shape[0], total, fisher)

  zero = jax.tree.map(jnp.zeros_like, variables["params"])
  batches = [(x[s:s + batch], y[s:s + batch]) for s in range(0, len(x), batch)]
  compile_s, seconds, total = _timed(step, zero, batches)
  return compile_s, seconds, jax.tree.map(lambda t: t / len(x), total)


def _accumulated(logits_fn, variables, x, y, kind, batch):
  """The Fisher by `mj.fisher`, called twice: the first call compiles the pass, the second reuses it."""
  batches = [(x[s:s + batch], y[s:s + batch]) for s in range(0, len(x), batch)]

  def call():
    start = time.perf_counter()
    total = jax.block_until_ready(mj.fisher(logits_fn, variables, batches, kind=kind, progress=False))
    return time.perf_counter() - start, total

  first, _ = call()
  seconds, total = call()
  return first - seconds, seconds, total["params"]


def _models():
  features = tuple(int(f) for f in _MLP_FEATURES.value)
  yield f"mlp{list(features)}", mj.models.build("mlp", features=features, num_classes=10)
  yield "resnet20", mj.models.build("resnet20", width_multiplier=_RESNET_WIDTH.value, num_classes=10)


def main(argv):
  del argv
  ds = mj.data.load("digits", seed=0)
  x, y = ds.x_train[:_EXAMPLES.value], ds.y_train[:_EXAMPLES.value]
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s);"
        f" digits, {len(x)} examples, batches of {_BATCH.value}")
  print(f"{'model':16s} {'params':>9s} {'kind':9s} {'method':10s} {'compile':>8s} {'time (s)':>9s}"
        f" {'x loop':>7s} {'max |diff|':>11s} {'rel':>9s}")
  for name, model in _models():
    variables = model.init(jax.random.key(0), x[:1])
    logits_fn = lambda v, x, model=model: model.apply(v, x, train=False)
    size = mj.tree.num_params(variables["params"])
    for kind in ("exact", "empirical"):
      _, base_time, base = loop = _per_example_loop(logits_fn, variables, x, y, kind)
      scale = max(float(jnp.max(leaf)) for leaf in jax.tree.leaves(base))
      rows = {"loop": loop,
              "transform": _transform(logits_fn, variables, x, y, kind, _BATCH.value),
              "mj.fisher": _accumulated(logits_fn, variables, x, y, kind, _BATCH.value)}
      for method, (compile_s, seconds, result) in rows.items():
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree.leaves(result), jax.tree.leaves(base)))
        print(f"{name:16s} {size:9,d} {kind:9s} {method:10s} {compile_s:8.2f} {seconds:9.3f}"
              f" {base_time / seconds:7.1f} {diff:11.2e} {diff / scale:9.2e}")


if __name__ == "__main__":
  app.run(main)
