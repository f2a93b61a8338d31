r"""Where a whole PLeaS merge spends its time: two ResNet-50s at budget 1.5.

    python -m experiments.benchmarks.pleas_profile
    python -m experiments.benchmarks.pleas_profile --model=resnet20 --examples=512

Two independently initialised zoo models (ResNet-50 at ImageNet widths by
default) and random normal images: `mj.merge.pleas` with weight matching,
the exact budget allocation, the closed-form least squares of every kernel,
and the batch-norm reset through `build_fn`. Prints the stage times of its
`Report` (trace, match, allocation, statistics, solves, repair), the Gram
memory, and the per-layer residuals' summary. A profile, not a race: there is
no baseline that merges two ResNet-50s under a budget (the reference code
needs Gurobi and an Adam fit per layer; `least_squares.py` times the fits).
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import mergejax as mj
from mergejax.merge import kernels as kernels_lib

_MODEL = flags.DEFINE_string("model", "resnet50", "Zoo model.")
_BUDGET = flags.DEFINE_float("budget", 1.5, "PLeaS budget.")
_INPUT = flags.DEFINE_integer("input_size", 64, "Input side.")
_EXAMPLES = flags.DEFINE_integer("examples", 256, "Random images read by the passes.")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per batch.")
_CHUNK = flags.DEFINE_integer("chunk", 8, "Images per step of the Gram pass.")


def main(argv):
  del argv
  model = mj.models.build(_MODEL.value)
  side = _INPUT.value
  x = np.asarray(jax.random.normal(jax.random.key(2), (_EXAMPLES.value, side, side, 3)), np.float32)
  init = jax.jit(model.init)
  va, vb = init(jax.random.key(0), x[:1]), init(jax.random.key(1), x[:1])
  apply_fn = functools.partial(model.apply, train=False)
  kernels = kernels_lib.model_kernels(apply_fn, va, x[:1])
  print(f"{_MODEL.value}: {mj.tree.num_params(va['params']):,} parameters, {len(kernels)} kernels,"
        f" Grams of [X_a | X_b] {kernels_lib.gram_bytes(kernels) / 2**30:.2f} GiB;"
        f" {_EXAMPLES.value} images {side}x{side}; device {jax.devices()[0].device_kind}")
  build_fn = lambda layout: functools.partial(
      mj.models.build(_MODEL.value, layout).apply, train=True, mutable=["batch_stats"])
  batches = lambda: (x[i:i + _BATCH.value] for i in range(0, len(x), _BATCH.value))
  start = time.perf_counter()
  merged, layout, report = mj.merge.pleas(
      apply_fn, va, vb, batches, budget=_BUDGET.value, spec=mj.models.permutation_spec(_MODEL.value, va),
      build_fn=build_fn, chunk=_CHUNK.value, report=True)
  total = time.perf_counter() - start
  print(f"budget {_BUDGET.value} -> cost {report.allocation.cost:.3f}; total {total:.1f} s")
  for stage, seconds in report.seconds.items():
    print(f"  {stage:12s} {seconds:8.1f} s  {100 * seconds / total:5.1f}%")
  before = np.array([r.residual_before for r in report.layers])
  after = np.array([r.residual_after for r in report.layers])
  print(f"  residual (relative, median over {len(after)} kernels): combined {np.median(before):.4f}"
        f" -> solved {np.median(after):.4f}; worst condition {max(r.condition for r in report.layers):.3g}")
  out = mj.models.build(_MODEL.value, layout).apply(merged, jnp.asarray(x[:8]), train=False)
  print(f"  merged model runs: output {out.shape}, finite {bool(jnp.all(jnp.isfinite(out)))}")


if __name__ == "__main__":
  app.run(main)
