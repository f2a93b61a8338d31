"""Linear assignment: an exact solver that runs inside `jax.jit`, and SciPy's.

    col = lap(cost)                     # int32[n]: the column of each row
    col = jax.jit(lap)(cost)            # also under jit and vmap

`method="jax"` is the Hungarian algorithm with potentials (Kuhn-Munkres in the
shortest-augmenting-path form of Jonker and Volgenant): one augmentation per
row, each a Dijkstra search over columns with reduced costs, written with
`lax.while_loop` so it compiles for CPU, GPU and TPU and runs without leaving
the device. It is exact: potentials keep every reduced cost non-negative and
every assigned pair's reduced cost zero, which certifies optimality (no
epsilon). `method="scipy"` calls `scipy.optimize.linear_sum_assignment` on the
host through `jax.pure_callback`. `method="auto"` chooses SciPy, which was
faster on the CPUs measured (experiments/benchmarks/RESULTS.md), directly on
concrete costs and through the callback under jit; the JAX solver is for
programs that must stay on an accelerator.

Costs must be square and finite. Concrete costs with NaN or Inf are refused;
under jit they cannot be checked, and the result is then unspecified.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

METHODS = ("auto", "jax", "scipy")


def _check(cost) -> None:
  shape = jnp.shape(cost)
  if len(shape) < 2 or shape[-1] != shape[-2]:
    raise ValueError(f"lap: cost must be square f32[n, n] (or a batch of them), got shape {shape}")
  if shape[-1] == 0:
    raise ValueError("lap: empty cost matrix")
  if not isinstance(cost, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(cost))):
    raise ValueError("lap: cost has NaN or Inf entries")


def lap(cost: jax.Array, maximize: bool = True, method: str = "auto") -> jax.Array:
  """The optimal assignment of rows to columns.

  Args:
    cost: f32[n, n], or f32[..., n, n] for a batch of problems.
    maximize: maximise the total (similarities) instead of minimising it.
    method: "auto", "jax" or "scipy" (see the module docstring).

  Returns:
    int32[..., n]: `col[i]` is the column assigned to row i; the assignment
    maximises (or minimises) `sum_i cost[i, col[i]]`.
  """
  if method not in METHODS:
    raise ValueError(f"lap: method must be one of {METHODS}, got {method!r}")
  _check(cost)
  if method != "jax" and not isinstance(cost, jax.core.Tracer):
    # Concrete costs: SciPy directly, without a callback's overhead; device_put, since jnp.asarray
    # compiles a small program per size.
    return jax.device_put(_scipy_host(np.asarray(cost, np.float32), maximize))
  cost = jnp.asarray(cost, jnp.float32)
  if method == "jax":
    flat = cost.reshape((-1,) + cost.shape[-2:])
    out = jax.vmap(_hungarian)(-flat if maximize else flat)
    return out.reshape(cost.shape[:-1])
  out = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
  return jax.pure_callback(functools.partial(_scipy_host, maximize=maximize), out, cost,
                           vmap_method="expand_dims")


def _scipy_host(c: np.ndarray, maximize: bool) -> np.ndarray:
  """Optimal assignments of f32[..., n, n] with SciPy: int32[..., n]."""
  c = np.asarray(c)
  if c.ndim == 2:
    return scipy.optimize.linear_sum_assignment(c, maximize)[1].astype(np.int32)
  cols = [scipy.optimize.linear_sum_assignment(m, maximize)[1] for m in c.reshape((-1,) + c.shape[-2:])]
  return np.stack(cols).reshape(c.shape[:-1]).astype(np.int32)


def _hungarian(cost: jax.Array) -> jax.Array:
  """Minimising assignment of one f32[n, n] by shortest augmenting paths.

  Columns are 1..n with a virtual column 0; `row_of[j]` is the row (1-based,
  0 for none) assigned to column j; u, v are the row and column potentials.
  """
  n = cost.shape[0]
  big = jnp.finfo(jnp.float32).max
  # Costs relative to their range keep the potentials' sums well inside f32.
  cost = cost - jnp.min(cost)

  def add_row(i, state):
    u, v, row_of, way = state
    row_of = row_of.at[0].set(i)
    minv = jnp.full(n + 1, big)
    used = jnp.zeros(n + 1, bool)

    def search(carry):
      u, v, minv, used, way, j0, _ = carry
      used = used.at[j0].set(True)
      i0 = row_of[j0]
      reduced = jnp.concatenate([jnp.array([big]), cost[i0 - 1] - u[i0] - v[1:]])
      better = ~used & (reduced < minv)
      minv = jnp.where(better, reduced, minv)
      way = jnp.where(better, j0, way)
      candidates = jnp.where(used, big, minv).at[0].set(big)
      j1 = jnp.argmin(candidates)
      delta = candidates[j1]
      assigned_rows = jnp.where(used, row_of, 0)
      u = u.at[assigned_rows].add(jnp.where(used, delta, 0.0))
      v = jnp.where(used, v - delta, v)
      minv = jnp.where(used, minv, minv - delta)
      return u, v, minv, used, way, j1, row_of[j1] == 0

    u, v, _, _, way, j0, _ = lax.while_loop(
        lambda c: ~c[-1], search, (u, v, minv, used, way, jnp.int32(0), False))

    def augment(carry):
      row_of, j0 = carry
      j1 = way[j0]
      return row_of.at[j0].set(row_of[j1]), j1

    row_of, _ = lax.while_loop(lambda c: c[1] != 0, augment, (row_of, j0))
    return u, v, row_of, way

  init = (jnp.zeros(n + 1, jnp.float32), jnp.zeros(n + 1, jnp.float32),
          jnp.zeros(n + 1, jnp.int32), jnp.zeros(n + 1, jnp.int32))
  _, _, row_of, _ = lax.fori_loop(1, n + 1, add_row, init)
  col = jnp.zeros(n, jnp.int32).at[row_of[1:] - 1].set(jnp.arange(n, dtype=jnp.int32))
  return col
