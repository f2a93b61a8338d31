"""DIMAT: decentralised iterative merging and training (Saadati et al. 2024).

N agents (models of one architecture) sit on a graph given by a mixing
matrix W (f32[N, N]: symmetric, non-negative, rows summing to 1, so doubly
stochastic; W[i, j] > 0 when j is i's neighbour). Each round every agent
aligns each neighbour to itself by activation matching on its own data,
takes the W-weighted average of itself and its aligned neighbours, then
trains locally on its own data:

    agents = mj.merge.dimat_round(apply_fn, agents, mj.merge.ring_mixing(4), batches_per_agent)
    agents, history = mj.merge.dimat(apply_fn, agents, W, batches_per_agent, train_fn,
                                     rounds=5, key=jax.random.key(0))

Training is the caller's `train_fn(variables, agent, round, key) ->
variables`, so any model and optimiser fit. A round's merges all read the
agents as they were at its start (a synchronous round), and each merged
leaf keeps its agent's dtype.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mergejax import align
from mergejax import permute
from mergejax import spec as spec_lib
from mergejax import trace
from mergejax import tree
from mergejax.merge.average import check_models

PyTree = Any
TrainFn = Callable[[PyTree, int, int, jax.Array], PyTree]

_weighted_sum = jax.jit(tree.weighted_sum)


def ring_mixing(n: int) -> np.ndarray:
  """f32[n, n]: each agent averages itself and its two ring neighbours, 1/3 each.

  Two agents give 1/2 each (the ring has one edge); one agent, [[1]].
  """
  _check_count(n)
  if n <= 2:
    return complete_mixing(n)
  w = np.zeros((n, n), np.float32)
  for i in range(n):
    for j in (i - 1, i, i + 1):
      w[i, j % n] = 1 / 3
  return w


def complete_mixing(n: int) -> np.ndarray:
  """f32[n, n]: the fully connected graph, every agent weighted 1/n."""
  _check_count(n)
  return np.full((n, n), 1 / n, np.float32)


def check_mixing(mixing: Any, n: int | None = None, *, atol: float = 1e-5) -> np.ndarray:
  """The mixing matrix as f64[n, n] NumPy, after checking it is a valid one.

  Args:
    mixing: f[n, n], symmetric, non-negative, each row summing to 1.
    n: the number of agents it must cover, if given.
    atol: tolerance of the symmetry and row-sum checks.

  Raises:
    ValueError: not square, the wrong size, not finite, negative, not
      symmetric or a row not summing to 1 (naming the row or entry).
  """
  w = np.asarray(mixing, np.float64)
  if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
    raise ValueError(f"mixing: need a square [n, n] matrix with n >= 1, got shape {w.shape}")
  if n is not None and w.shape[0] != n:
    raise ValueError(f"mixing: {w.shape[0]} x {w.shape[0]} matrix for {n} agents")
  if not np.all(np.isfinite(w)):
    raise ValueError("mixing: has non-finite entries")
  if np.any(w < 0):
    i, j = np.argwhere(w < 0)[0]
    raise ValueError(f"mixing: entry [{i}, {j}] = {w[i, j]} is negative")
  if not np.allclose(w, w.T, atol=atol, rtol=0):
    i, j = np.unravel_index(np.argmax(np.abs(w - w.T)), w.shape)
    raise ValueError(f"mixing: not symmetric: [{i}, {j}] = {w[i, j]} but [{j}, {i}] = {w[j, i]}")
  sums = w.sum(axis=1)
  bad = np.flatnonzero(np.abs(sums - 1) > atol)
  if bad.size:
    raise ValueError(f"mixing: row {bad[0]} sums to {sums[bad[0]]}, not 1 (need doubly stochastic)")
  return w


def dimat_round(
    apply_fn: Callable[..., Any],
    agents: Sequence[PyTree],
    mixing: Any,
    batches_per_agent: Sequence[Any],
    *,
    spec: spec_lib.PermutationSpec | None = None,
    lap_method: str = "auto",
) -> list[PyTree]:
  """One merge step of DIMAT: every agent averages itself and its aligned neighbours.

  Agent i's new variables are sum_j W[i, j] * P_ij(agents[j]), where P_ii is
  the identity and P_ij permutes agent j's units onto agent i's by
  `mj.activation_matching` on `batches_per_agent[i]` (agent i's own data).
  Agents with W[i, j] = 0 are not aligned.

  Args:
    apply_fn: `apply_fn(variables, x)`, e.g. a Flax `model.apply` in eval mode.
    agents: N pytrees of one structure and shapes.
    mixing: f[N, N], checked by `check_mixing`.
    batches_per_agent: N batches (DESIGN.md, batches), each a sequence or a
      callable returning a fresh iterable (read once per neighbour).
    spec: the permutation groups; traced from agent 0 and the first batch of
      agent 0 when None. A spec with no groups averages without aligning.
    lap_method: `mergejax.lap`'s method.

  Returns:
    The N merged agents, a new list.

  Raises:
    ValueError: before any data pass, for mismatched agents (naming the leaf
      path), a bad mixing matrix, the wrong number of batches, one-shot
      iterators, or a spec that does not fit the agents.
  """
  agents, w = _check_inputs(agents, mixing, batches_per_agent)
  spec = _spec_for(apply_fn, agents, batches_per_agent, spec)
  return _merge(apply_fn, agents, w, batches_per_agent, spec, lap_method)


def dimat(
    apply_fn: Callable[..., Any],
    agents: Sequence[PyTree],
    mixing: Any,
    batches_per_agent: Sequence[Any],
    train_fn: TrainFn,
    *,
    rounds: int,
    key: jax.Array,
    spec: spec_lib.PermutationSpec | None = None,
    callback: Callable[[int, list[PyTree]], Any] | None = None,
    lap_method: str = "auto",
) -> tuple[list[PyTree], list[Any]]:
  """DIMAT: `rounds` rounds of `dimat_round` followed by local training.

  Args:
    apply_fn, agents, mixing, batches_per_agent, spec, lap_method: as in
      `dimat_round` (the spec is traced once, before round 0).
    train_fn: `train_fn(variables, agent, round, key) -> variables`, agent
      `agent`'s local training after round `round`'s merge.
    rounds: number of merge-and-train rounds, >= 0.
    key: PRNG key; round r gives agent i `fold_in(fold_in(key, r), i)`.
    callback: `callback(round, agents)` after each round's training
      (e.g. the agents' validation accuracy).

  Returns:
    (the agents after the last round, [callback's value per round], empty
    without a callback).
  """
  if not isinstance(rounds, int) or rounds < 0:
    raise ValueError(f"dimat: rounds must be an int >= 0, got {rounds!r}")
  if not callable(train_fn):
    raise ValueError("dimat: train_fn must be callable")
  agents, w = _check_inputs(agents, mixing, batches_per_agent)
  spec = _spec_for(apply_fn, agents, batches_per_agent, spec)
  history = []
  for r in range(rounds):
    agents = _merge(apply_fn, agents, w, batches_per_agent, spec, lap_method)
    round_key = jax.random.fold_in(key, r)
    agents = [train_fn(a, i, r, jax.random.fold_in(round_key, i)) for i, a in enumerate(agents)]
    if callback is not None:
      history.append(callback(r, agents))
  return agents, history


def _merge(apply_fn, agents, w, batches_per_agent, spec, lap_method) -> list[PyTree]:
  merged = []
  for i, agent in enumerate(agents):
    neighbours = [j for j in range(len(agents)) if j != i and w[i, j] > 0]
    others = [agents[j] for j in neighbours]
    if others and spec.groups:
      # One pass per neighbour; `batches` by keyword so `activation_matching` sees a list of models.
      matches = align.activation_matching(spec, apply_fn, agent, others, batches=batches_per_agent[i],
                                          lap_method=lap_method, progress=False)
      others = [permute.apply_permutation(spec, m.perm, o) for m, o in zip(matches, others)]
    weights = np.asarray([w[i, i]] + [w[i, j] for j in neighbours], np.float32)
    merged.append(_weighted_sum([agent, *others], weights))
  return merged


def _check_inputs(agents, mixing, batches_per_agent) -> tuple[list[PyTree], np.ndarray]:
  agents = check_models(agents)
  w = check_mixing(mixing, len(agents))
  batches_per_agent = list(batches_per_agent)
  if len(batches_per_agent) != len(agents):
    raise ValueError(f"batches_per_agent: {len(batches_per_agent)} for {len(agents)} agents")
  for i, b in enumerate(batches_per_agent):
    if not callable(b) and iter(b) is b:
      raise ValueError(f"batches_per_agent[{i}]: a one-shot iterator; pass a sequence or a callable "
                       "returning a fresh iterable (it is read once per neighbour)")
  return agents, w


def _spec_for(apply_fn, agents, batches_per_agent, spec) -> spec_lib.PermutationSpec:
  if spec is None:
    example, _ = align.peek(batches_per_agent[0])
    spec = trace.permutation_spec(apply_fn, agents[0], example)
  spec_lib.check_spec(spec, agents[0])
  return spec


def _check_count(n: int) -> None:
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"need an int number of agents >= 1, got {n!r}")
