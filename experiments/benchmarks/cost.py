r"""The real cost of merged models: dense against compact, against the budget.

    python -m experiments.benchmarks.cost --models=resnet20,vgg,vit --budgets=1.2,1.5,1.8

For each zoo model and budget, PLeaS merges two random inits (keys 0 and 1)
twice: allocated by FLOPs (`cost="flops"`) and by parameters
(`cost="params"`). Each merge is measured in its counter against one
original model: FLOPs per example from XLA's cost analysis of the compiled
function (`jax.jit(f).lower(...).compile().cost_analysis()`: every operation,
where the budget counts the kernels' MACs, in-image taps only), parameters as
the stored entries of every leaf (`tree.num_params`, batch statistics
included, as `cost="params"` counts them). The baseline is the dense form
PLeaS returns (masked blocks stored as zeros and run); ours is
`compact_variables` run by `compact_apply`. Printed: the cost the
allocation reached (the budget's own count, at or below the budget), both
forms' ratios to the original, the compact ratio over the budget, and the
largest difference of the two forms' outputs (logits) on the same images.

With `--time_batch=N`, each FLOPs row also prints the wall time of one jitted
forward pass of N images (median of `--time_repeats`, compilation excluded)
of the dense and the compact form over the original's: what the FLOPs buy on
this device (on CPU, small layers are not bound by their FLOPs).
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from mergejax.merge import compact

_MODELS = flags.DEFINE_list("models", ["resnet20", "vgg", "vit"], "Zoo models (32x32x3 images).")
_BUDGETS = flags.DEFINE_list("budgets", ["1.2", "1.5", "1.8"], "Budgets.")
_IMAGES = flags.DEFINE_integer("images", 32, "Images for the statistics and the output check.")
_GRID = flags.DEFINE_integer("grid", 11, "Merge ratios a group may take: np.linspace(0, 1, grid) (PLeaS's default 11).")
_TIME_BATCH = flags.DEFINE_integer("time_batch", 0, "Images per timed forward pass (0: no timing).")
_TIME_REPEATS = flags.DEFINE_integer("time_repeats", 10, "Timed passes per form (the median is printed).")
_LEAST_SQUARES = flags.DEFINE_bool("least_squares", False,
                                   "Fit the layers by least squares (the layout, so the cost, is the same).")


def _flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


def _seconds(fn, *args) -> float:
  """The median wall time of `--time_repeats` calls of `jax.jit(fn)(*args)`, compiled beforehand."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_TIME_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s), jax {jax.__version__}")
  print(f"{'model':9s} {'counter':7s} {'budget':>6s} {'reached':>7s} {'dense':>6s} {'compact':>7s}"
        f" {'compact/budget':>14s} {'max |dy|':>9s} {'seconds':>7s}")
  x = jax.random.normal(jax.random.key(2), (_IMAGES.value, 32, 32, 3))
  timed = jax.random.normal(jax.random.key(3), (_TIME_BATCH.value, 32, 32, 3)) if _TIME_BATCH.value else None
  for name in _MODELS.value:
    model = mj.models.build(name, num_classes=10)
    va = model.init(jax.random.key(0), x[:1])
    vb = model.init(jax.random.key(1), x[:1])
    spec = mj.models.permutation_spec(name, va)
    apply = functools.partial(model.apply, train=False)
    inputs = compact.kernel_inputs(apply, va, x[:1])
    original = {"flops": _flops(apply, va, x[:1]), "params": mj.tree.num_params(va)}
    original_seconds = _seconds(apply, va, timed) if timed is not None else None
    for budget in map(float, _BUDGETS.value):
      for counter in ("flops", "params"):
        start = time.perf_counter()
        merged, layout, report = mj.merge.pleas(
            apply, va, vb, [x], budget=budget, spec=spec, cost=counter, report=True,
            grid=tuple(np.linspace(0.0, 1.0, _GRID.value)),
            least_squares_fit=_LEAST_SQUARES.value, progress=False,
            build_fn=(lambda layout: functools.partial(mj.models.build(name, layout, num_classes=10).apply,
                                                       train=True, mutable=["batch_stats"]))
            if "batch_stats" in va else None)
        small = compact.compact_variables(spec, layout, merged, inputs=inputs)
        merged_apply = functools.partial(mj.models.build(name, layout, num_classes=10).apply, train=False)
        compact_apply = compact.compact_apply(merged_apply)
        if counter == "flops":
          dense_cost, compact_cost = _flops(merged_apply, merged, x[:1]), _flops(compact_apply, small, x[:1])
        else:
          dense_cost, compact_cost = mj.tree.num_params(merged), mj.tree.num_params(small)
        diff = float(jnp.max(jnp.abs(jax.jit(merged_apply)(merged, x) - jax.jit(compact_apply)(small, x))))
        seconds = time.perf_counter() - start
        dense_ratio, compact_ratio = dense_cost / original[counter], compact_cost / original[counter]
        print(f"{name:9s} {counter:7s} {budget:6.2f} {report.allocation.cost:7.4f} {dense_ratio:6.4f}"
              f" {compact_ratio:7.4f} {compact_ratio / budget:14.4f} {diff:9.2e} {seconds:7.1f}", flush=True)
        if original_seconds is not None and counter == "flops":
          dense_time, compact_time = _seconds(merged_apply, merged, timed), _seconds(compact_apply, small, timed)
          print(f"{'':9s} time of {_TIME_BATCH.value} images: original {original_seconds:.3f} s, dense"
                f" {dense_time / original_seconds:.3f}x, compact {compact_time / original_seconds:.3f}x", flush=True)
        if not np.isfinite(diff):
          raise RuntimeError(f"{name} at {budget}: the outputs are not finite")


if __name__ == "__main__":
  app.run(main)
