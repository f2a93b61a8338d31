r"""Weight matching: mergejax against Git Re-Basin's loop, two ResNet-50s.

    python -m experiments.benchmarks.weight_matching --model=resnet50

Two independently initialised zoo models (ResNet-50 at ImageNet widths by
default). Baseline: Git Re-Basin's weight matching loop (Ainsworth et al.
2023, `weight_matching` in samuela/git-re-basin), re-implemented faithfully:
each iteration visits the groups in a random order
(`np.random.default_rng(seed)`), builds each group's cost on the host,
solves it with `scipy.optimize.linear_sum_assignment`, and the loop stops
after an iteration that improves no group. Ours: `mj.weight_matching` with
`key=jax.random.key(seed)` (host sweeps over cached cost terms, NumPy
products and orders: it compiles nothing), whose group orders are those
`default_rng(seed)` draws, so both visit the groups in the same orders and
the times compare the same sweeps. Each is timed on its first call in this
fresh process and on a second call, with its sweep count and final
objective `<va, P(vb)>`; the gain is the objective's rise over no matching,
as a fraction of the baseline's. Run it on an idle machine: the figures
scale with the load (printed, with the BLAS and its threads, which both
use).
"""

import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import threadpoolctl

import mergejax as mj
from mergejax import align

_MODEL = flags.DEFINE_string("model", "resnet50", "Zoo model.")
_INPUT = flags.DEFINE_integer("input_size", 64, "Input side (parameters do not depend on it).")
_MAX_ITER = flags.DEFINE_integer("max_iter", 100, "Most iterations (sweeps) for both.")
_SEED = flags.DEFINE_integer("seed", 0, "Group orders: the baseline's NumPy seed and our key's.")
_BASELINE_AGAIN = flags.DEFINE_bool("baseline_again", True,
                                    "Time the baseline's second call too (it compiles nothing).")


def rebasin_loop(spec, va, vb, seed: int, max_iter: int):
  """Git Re-Basin's weight matching loop on the host (float32 NumPy + SciPy)."""
  a = {p: np.asarray(x, np.float32) for p, x in mj.tree.leaves_by_path(va).items()}
  b = {p: np.asarray(x, np.float32) for p, x in mj.tree.leaves_by_path(vb).items()}
  by_path = {}
  for g, refs in spec.groups.items():
    for r in refs:
      by_path.setdefault(r.path, []).append((g, r))
  perm = {g: np.arange(n) for g, n in spec.sizes.items()}
  rng = np.random.default_rng(seed)
  names = list(spec.groups)
  for iteration in range(max_iter):
    progress = False
    for g in rng.permutation(names):
      n = spec.sizes[g]
      cost = np.zeros((n, n), np.float32)
      for ref in spec.groups[g]:
        w_b = b[ref.path]
        for h, r in by_path[ref.path]:
          if r != ref:
            w_b = np.asarray(mj.permute.take_units(w_b, perm[h], r))
        cost += np.asarray(align.unit_rows(a[ref.path], ref)) @ np.asarray(align.unit_rows(w_b, ref)).T
      _, col = scipy.optimize.linear_sum_assignment(cost, maximize=True)
      old = cost[np.arange(n), perm[g]].sum()
      new = cost[np.arange(n), col].sum()
      progress = progress or new > old + 1e-12
      perm[g] = col
    if not progress:
      break
  return perm, iteration + 1


def objective(spec, perm, va, vb) -> float:
  aligned = mj.apply_permutation(spec, perm, vb)
  return float(sum(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64))
                   for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(aligned))))


def main(argv):
  del argv
  model = mj.models.build(_MODEL.value)
  x = jnp.zeros((1, _INPUT.value, _INPUT.value, 3))
  init = jax.jit(model.init)
  va, vb = init(jax.random.key(0), x), init(jax.random.key(1), x)
  start = time.perf_counter()
  spec = mj.permutation_spec(model.apply, va, x)
  print(f"{_MODEL.value}: {mj.tree.num_params(va['params']):,} parameters, {len(spec.groups)} groups;"
        f" traced spec in {time.perf_counter() - start:.1f} s; device {jax.devices()[0].platform}")

  def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start

  blas = [(p["internal_api"], p["num_threads"]) for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
  print(f"BLAS (api, threads): {blas}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
  seed = _SEED.value
  base = lambda: rebasin_loop(spec, va, vb, seed=seed, max_iter=_MAX_ITER.value)  # noqa: E731
  ours = lambda: mj.weight_matching(spec, va, vb, key=jax.random.key(seed), max_sweeps=_MAX_ITER.value)  # noqa: E731
  load = os.getloadavg()[0]
  (base_perm, base_sweeps), base_first = timed(base)
  base_again = timed(base)[1] if _BASELINE_AGAIN.value else float("nan")
  result, ours_first = timed(ours)
  result, ours_again = timed(ours)
  ours_sweeps = len(result.objective_trace)
  identity = objective(spec, mj.permute.identity_permutation(spec), va, vb)
  base_obj, ours_obj = objective(spec, base_perm, va, vb), objective(spec, result.perm, va, vb)
  load = max(load, os.getloadavg()[0])

  print(f"{'method':32s} {'1st call (s)':>12s} {'2nd call (s)':>12s} {'sweeps':>7s} {'objective':>12s} {'gain':>7s}")
  print(f"{'identity (no matching)':32s} {'':12s} {'':12s} {'':7s} {identity:12.2f}")
  rows = (("Git Re-Basin loop (NumPy, SciPy)", base_first, base_again, base_sweeps, base_obj),
          ("mergejax", ours_first, ours_again, ours_sweeps, ours_obj))
  for name, first, again, sweeps, obj in rows:
    gain = (obj - identity) / (base_obj - identity)
    print(f"{name:32s} {first:12.2f} {again:12.2f} {sweeps:7d} {obj:12.2f} {gain:7.4f}")
  print(f"speed-up: {base_first / ours_first:.1f}x first call (compilation included),"
        f" {base_again / ours_again:.1f}x second call; load average {load:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
  app.run(main)
