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

Beside the stage times, each stage's floor: its FLOPs over the matrix-product
peak measured in the same process (a float32 `jnp.dot` at HIGHEST precision,
best of three). Counted FLOPs: statistics, both models' forward passes (XLA's
cost analysis) plus every Gram's three blocks `2 rows 3 d^2` (d the kernel's
input features in one model); solves, per kernel the system's products (`4 (2 d^2
k + 2 d k^2)`, k its output features in one model) and per block a Cholesky
factorisation (`p^3 / 3`) and two triangular solves (`2 p^2 q`), p its input
rows and q its output columns, except for a layer kept whole (inputs and
outputs: its blocks keep their weights, `least_squares._own_solution`), which
costs only `||Y||^2`'s products `G_ss W_s` (`2 d^2 k` per model); repair, the merged model's forward passes
(cost analysis). Match and allocation have no floor here (weight matching's
is in the weight matching section of RESULTS.md; the allocation is a MILP and
gathers).
"""

import functools
import os
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
  peak = matmul_peak()
  floors = stage_flops(apply_fn, va, merged, mj.models.build(_MODEL.value, layout).apply, kernels, report, x)
  print(f"  matrix-product peak {peak / 1e9:.1f} GFLOP/s (float32, HIGHEST);"
        " floor = counted FLOPs / peak, load " + " ".join(f"{v:.1f}" for v in os.getloadavg()))
  print(f"  {'stage':12s} {'seconds':>8s} {'GFLOP':>9s} {'floor s':>8s} {'of peak':>8s}")
  for stage, flops in floors.items():
    seconds = report.seconds[stage]
    print(f"  {stage:12s} {seconds:8.1f} {flops / 1e9:9.1f} {flops / peak:8.2f} {flops / peak / seconds:8.1%}")
  out = mj.models.build(_MODEL.value, layout).apply(merged, jnp.asarray(x[:8]), train=False)
  print(f"  merged model runs: output {out.shape}, finite {bool(jnp.all(jnp.isfinite(out)))}")


def matmul_peak(n: int = 3072) -> float:
  """FLOP/s of a float32 n x n matrix product at HIGHEST precision, best of three."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  dot = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST))
  jax.block_until_ready(dot(a))
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(dot(a))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def forward_flops(apply_fn, variables, x) -> float:
  """FLOPs of `apply_fn(variables, x)` by XLA's cost analysis of the compiled program."""
  cost = jax.jit(apply_fn).lower(variables, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def stage_flops(apply_fn, va, merged, merged_apply, kernels, report, x) -> dict[str, float]:
  """The FLOPs counted for the statistics, solves and repair stages (see the module docstring)."""
  n = len(x)
  forward = forward_flops(apply_fn, va, x[:1]) * n
  by_path = {k.path: k for k in kernels}
  leaves = mj.tree.leaves_by_path(merged)
  gram, solves = 0.0, 0.0
  for layer in report.layers:
    k = by_path[layer.path]
    d = int(np.prod([k.shape[a] for a in k.plan.in_axes]))
    outputs = int(np.prod([k.shape[a] for a in k.plan.out_axes]))
    positions = k.positions  # output rows per example (k.macs counts only in-image taps)
    gram += 2 * n * positions * 3 * d**2  # the symmetric Gram's blocks X_a^T X_a, X_a^T X_b, X_b^T X_b
    shape = np.shape(leaves[layer.path])
    d_merged = int(np.prod([shape[a] for a in k.plan.in_axes]))
    if layer.blocks[0] == 0 and d_merged == 2 * d:  # kept whole: only ||Y||^2 of each model's block, G_ss W_s
      solves += 2 * (2 * d**2 * outputs)
      continue
    solves += 4 * (2 * d**2 * outputs + 2 * d * outputs**2)
    for rows, columns in zip((d_merged, d, d), layer.blocks):
      if columns:
        solves += rows**3 / 3 + 2 * rows**2 * columns
  train = lambda v, x: merged_apply(v, x, train=True, mutable=["batch_stats"])
  repair = forward_flops(train, merged, x[:1]) * n
  return {"statistics": 2 * forward + gram, "solves": solves, "repair": repair}


if __name__ == "__main__":
  app.run(main)
