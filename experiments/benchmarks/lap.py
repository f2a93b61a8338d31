r"""Linear assignment: mergejax.lap against SciPy and optax's Hungarian algorithm.

    python -m experiments.benchmarks.lap --max_n=2048 --optax_max_n=512

For each size and cost kind (uniform random; weight-matching-like C = A B^T),
times (median of --repeats runs, after compilation) of our on-device solver
(`method="jax"`), `method="auto"` under jit ("auto") and called on a NumPy
array ("eager"), `scipy.optimize.linear_sum_assignment` and
a jitted `optax.assignment.hungarian_algorithm`, on the same inputs, with each
result's objective and whether it equals SciPy's optimum.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from mergejax.lap import lap

_MAX_N = flags.DEFINE_integer("max_n", 2048, "Largest n.")
_OPTAX_MAX_N = flags.DEFINE_integer("optax_max_n", 512, "Largest n for the optax baseline (slow).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per solver (median).")


def _cost(kind: str, n: int, rng) -> np.ndarray:
  if kind == "uniform":
    return rng.uniform(size=(n, n)).astype(np.float32)
  a, b = rng.standard_normal((n, 4 * n)), rng.standard_normal((n, 4 * n))
  return (a @ b.T).astype(np.float32)


def _time(fn, repeats: int) -> tuple[float, np.ndarray]:
  out = np.asarray(jax.block_until_ready(fn()))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn()))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), out


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s)")
  print(f"{'kind':8s} {'n':>5s} {'solver':8s} {'time (s)':>9s} {'x scipy':>8s} {'objective':>14s} optimal")
  ours = jax.jit(lambda c: lap(c, maximize=True, method="jax"))
  auto = jax.jit(lambda c: lap(c, maximize=True, method="auto"))
  @jax.jit
  def hungarian(c):
    rows, cols = optax.assignment.hungarian_algorithm(-c)  # pairs, in no row order
    return jnp.zeros(c.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))

  n = 256
  while n <= _MAX_N.value:
    for kind in ("uniform", "product"):
      c = _cost(kind, n, rng)
      cj = jnp.asarray(c)
      solvers = {
          "scipy": lambda: scipy.optimize.linear_sum_assignment(c, maximize=True)[1],
          "jax": lambda: ours(cj),
          "auto": lambda: auto(cj),
          "eager": lambda: lap(c, maximize=True),
      }
      if n <= _OPTAX_MAX_N.value:
        solvers["optax"] = lambda: hungarian(cj)
      best = None
      for name, fn in solvers.items():
        seconds, col = _time(fn, _REPEATS.value)
        objective = float(c.astype(np.float64)[np.arange(n), col].sum())
        if name == "scipy":
          base, best = seconds, objective
        optimal = abs(objective - best) <= 1e-6 * abs(best) + 1e-3
        print(f"{kind:8s} {n:5d} {name:8s} {seconds:9.4f} {seconds / base:8.2f} {objective:14.4f} {optimal}")
    n *= 2


if __name__ == "__main__":
  app.run(main)
