"""Aligning models by permutation: weight, activation and straight-through matching.

    spec = mj.permutation_spec(model.apply, va, x)
    res = mj.weight_matching(spec, va, vb, key=key)
    vb_aligned = mj.apply_permutation(spec, res.perm, vb)   # same function as vb

Every method returns a `MatchResult(perm, objective_trace, pair_scores)`:
`perm[g]` (int32[n]) maps model B's unit `perm[g][i]` onto model A's unit i
(DESIGN.md, Permutations), `pair_scores[g]` (f32[n]) scores each matched pair
(partial matching merges the best-scored ones), and `objective_trace` records
the objective the method maximises, one entry per sweep or step. Given a
sequence of models as `vb`, each is aligned to the reference `va` and a list of
results comes back.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import functools
import itertools
from typing import Any, NamedTuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from mergejax import distributed
from mergejax import lap as lap_lib
from mergejax import permute
from mergejax import spec as spec_lib
from mergejax import stacked
from mergejax import stats
from mergejax import trace
from mergejax import tree
from mergejax.lap import lap

PyTree = Any
Perm = dict[str, jax.Array]
# The most bytes of cost terms weight matching keeps between a group's solves (_HostSweeps).
_TERM_CACHE_BYTES = 1 << 30
# A cached term is updated by the units that moved (rather than recomputed) when at most
# 1/_UPDATE_FRACTION of the units of the group it reads moved: the update's product is that
# fraction of the whole one, and its gathers about three times that fraction of the whole's.
_UPDATE_FRACTION = 4


class MatchResult(NamedTuple):
  """What a matching returns.

  Attributes:
    perm: group -> int32[n], B's unit perm[g][i] goes to A's unit i.
    objective_trace: f32[steps], the objective after each sweep (weight
      matching), the summed correlation (activation matching), or the loss per
      step (straight-through matching).
    pair_scores: group -> f32[n], the similarity of each matched pair.
  """

  perm: Perm
  objective_trace: jax.Array
  pair_scores: dict[str, jax.Array]


def _check_models(spec: spec_lib.PermutationSpec, va: PyTree, vb: PyTree) -> None:
  tree.check_same_structure(va, vb)
  tree.check_same_shapes(va, vb)
  spec_lib.check_spec(spec, va)


def _permuted_leaves(spec: spec_lib.PermutationSpec, perm: Perm, leaves: dict) -> dict:
  """Every leaf of `leaves` (keyed by path) permuted by all the groups."""
  out = dict(leaves)
  for g, refs in spec.groups.items():
    for ref in refs:
      out[ref.path] = permute.take_units(out[ref.path], perm[g], ref)
  return out


def unit_rows(x: jax.Array, ref: spec_lib.AxisRef) -> jax.Array:
  """The units of `ref`'s axis (its part, if it has one) as rows: [n, everything else] (NumPy for NumPy)."""
  xp = np if isinstance(x, np.ndarray) else jnp
  axis = ref.axis
  if ref.part is not None:
    x = x[(slice(None),) * axis + (slice(*ref.part),)]
  if ref.factor is not None:
    view, index = ref.factor
    x = x.reshape(x.shape[:axis] + tuple(view) + x.shape[axis + 1:])
    axis += index
  return xp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _many(fn: Callable[..., MatchResult]) -> Callable[..., Any]:
  """Lets `vb` be one model or a sequence of models aligned to `va`."""

  @functools.wraps(fn)
  def wrapper(spec, *args, **kwargs):
    *lead, va, vb = args
    if isinstance(vb, Sequence) and not isinstance(vb, str) and vb and _is_model_list(va, vb):
      return [fn(spec, *lead, va, one, **kwargs) for one in vb]
    return fn(spec, *args, **kwargs)

  return wrapper


def _is_model_list(va: PyTree, vb: Sequence) -> bool:
  return jax.tree.structure(vb[0]) == jax.tree.structure(va)


class _WeightCosts:
  """Per-group similarity of A's units to B's, given the other groups' perms."""

  def __init__(self, spec: spec_lib.PermutationSpec):
    self.spec = spec
    self.names = list(spec.groups)
    by_path: dict[tuple[str, ...], list[tuple[str, spec_lib.AxisRef]]] = {}
    for g, refs in spec.groups.items():
      for ref in refs:
        by_path.setdefault(ref.path, []).append((g, ref))
    self.by_path = by_path

  def cost(self, g: str, perm: Perm, a: dict, b: dict) -> jax.Array:
    """f32[n, n]: sum over g's axes of <A's unit i, B's unit j>, B's other axes permuted."""
    n = self.spec.sizes[g]
    total = jnp.zeros((n, n), jnp.float32)
    for ref in self.spec.groups[g]:
      leaf_b = b[ref.path]
      for h, r in self.by_path[ref.path]:
        if r != ref:
          leaf_b = permute.take_units(leaf_b, perm[h], r)
      rows_a = unit_rows(jnp.asarray(a[ref.path], jnp.float32), ref)
      rows_b = unit_rows(jnp.asarray(leaf_b, jnp.float32), ref)
      total += jnp.dot(rows_a, rows_b.T, precision=jax.lax.Precision.HIGHEST)
    return total


@_many
def weight_matching(
    spec: spec_lib.PermutationSpec,
    va: PyTree,
    vb: PyTree,
    *,
    key: jax.Array | None = None,
    max_sweeps: int = 100,
    init_perm: Mapping[str, Any] | None = None,
    lap_method: str = "auto",
    tol: float = 1e-7,
) -> MatchResult:
  """Git Re-Basin's weight matching: coordinate descent over groups.

  Each sweep visits every group in a random order and solves a linear
  assignment for it, maximising `sum_leaves <va, permuted vb>` with the other
  groups' permutations held. Sweeps stop after one in which no group's own
  objective rose by more than 1e-6 of it (Git Re-Basin's progress test, at
  float32 resolution; so after one that changes no assignment), when the
  total objective grows by no more than `tol` (relative) from one sweep to
  the next (from the third sweep), or after `max_sweeps`.

  Variables on the host (NumPy, or this process's CPU arrays) are matched by
  host sweeps over cached cost terms (`_HostSweeps`): a term is recomputed
  only when a group it reads changed (updated by the moved units alone when
  few moved), a group is solved again only when one of its terms changed,
  the products are NumPy's and SciPy assigns, so nothing is compiled.
  Others (accelerators, several processes) run
  the loop as one compiled program per spec, a `fori_loop` over a
  `lax.switch` on groups; both give the same result.

  Args:
    spec: the permutation groups (e.g. `permutation_spec(...)`).
    va: the reference model's variables.
    vb: the model to align (or a sequence of models, each aligned to `va`).
    key: the order of groups in each sweep (drawn on the host: `key(s)`
      gives the orders `np.random.default_rng(s)` draws); default key 0.
    max_sweeps: the most sweeps.
    init_perm: the starting permutations (default identity).
    lap_method: `mergejax.lap`'s method.
    tol: relative objective improvement below which the sweeps stop.

  A spec with batched groups (stacked copies) is matched on
  `stacked.unstack`'s flat spec (each copy its own group, in that spec's
  order), and its perm and pair scores come back stacked, int32[L, n] and
  f32[L, n]: the same result as matching the unrolled model with its groups
  in that order.

  Returns:
    MatchResult; `objective_trace[s]` is the objective after sweep s.
  """
  _check_models(spec, va, vb)
  if lap_method not in lap_lib.METHODS:
    raise ValueError(f"weight_matching: lap_method must be one of {lap_lib.METHODS}, got {lap_method!r}")
  key = jax.random.key(0) if key is None else key
  if spec.batch_sizes:
    flat_spec, fa = stacked.unstack(spec, va)
    fb = stacked.unstack(spec, vb)[1]
    init = None if init_perm is None else stacked.unstack_permutation(spec, init_perm)
    res = weight_matching.__wrapped__(flat_spec, fa, fb, key=key, max_sweeps=max_sweeps, init_perm=init,
                                      lap_method=lap_method, tol=tol)
    return _replicated_like(MatchResult(stacked.stack_permutation(spec, res.perm), res.objective_trace,
                                        stacked.stack_permutation(spec, res.pair_scores)), va)
  if _on_host((va, vb)):
    perm0 = {g: np.array(init_perm[g] if init_perm is not None else np.arange(n), np.int32)
             for g, n in spec.sizes.items()}
    orders = _sweep_orders(key, len(spec.groups), max_sweeps)
    perm, history, scores = _HostSweeps(spec, va, vb, lap_method).run(orders, perm0, float(tol))
    return _replicated_like(jax.device_put(MatchResult(perm, history, scores)), va)
  perm0 = permute.identity_permutation(spec) if init_perm is None else dict(init_perm)
  perm0 = {g: jnp.asarray(perm0[g], jnp.int32) for g in spec.groups}
  run = _weight_matching_loop(_spec_key(spec), lap_method, float(tol))
  perm, trace_, sweeps = run(_sweep_orders(key, len(spec.groups), max_sweeps), perm0, va, vb)
  scores = _pair_scores(_spec_key(spec))(perm, va, vb)
  return _replicated_like(MatchResult(perm, trace_[: int(sweeps)], scores), va)


def _replicated_like(result: PyTree, variables: PyTree) -> PyTree:
  """result replicated over the mesh of the first `NamedSharding` leaf of
  variables (a sharded model's permutations are the same on every device and
  process; under jit SciPy's assignment lands on one device), else as is."""
  for leaf in jax.tree.leaves(variables):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.device_put(result, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
  return result


def _on_host(variables: PyTree) -> bool:
  """Whether every leaf is a NumPy value or a CPU array this process holds whole."""
  for leaf in jax.tree.leaves(variables):
    if isinstance(leaf, jax.core.Tracer):
      return False
    if isinstance(leaf, jax.Array) and not (
        leaf.is_fully_addressable and all(d.platform == "cpu" for d in leaf.devices())):
      return False
  return True


def _sweep_orders(key: jax.Array, num_groups: int, num_sweeps: int) -> np.ndarray:
  """int32[num_sweeps, num_groups]: the order of the groups in each sweep.

  Drawn on the host, so no program is compiled and the same key gives the
  same orders on every path and process: NumPy's default generator seeded
  with the key's data words read as one integer, most significant first
  (`jax.random.key(s)` draws what `np.random.default_rng(s)` draws).
  """
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  rng = np.random.default_rng(functools.reduce(lambda x, w: x << 32 | int(w), np.asarray(key, np.uint32).ravel(), 0))
  return np.array([rng.permutation(num_groups) for _ in range(num_sweeps)], np.int32).reshape(num_sweeps, num_groups)


def _unit_products(rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
  """f32[n, n] = rows_a @ rows_b.T for f32[n, m] rows: NumPy's (BLAS) product,
  nothing to compile (XLA's compiled one per shape cost more to compile than
  it saved on a first call)."""
  return rows_a @ rows_b.T


def _host_assignment(cost: np.ndarray, method: str) -> np.ndarray:
  """int32[n]: `lap`'s maximising assignment of a host cost f32[n, n], as NumPy."""
  return np.asarray(lap(cost, maximize=True, method=method))


class _HostSweeps:
  """Git Re-Basin's coordinate descent on the host: NumPy gathers and products, SciPy assignments.

  A group's cost is a sum of terms, one per AxisRef `r` of the group: A's
  unit rows along r times B's, with B's leaf permuted along the leaf's other
  refs (`others`, pairs (group, ref)). A term with no others (a bias, a
  normalisation scale, a classifier's kernel) never changes and is summed
  once into the group's `fixed` cost; the others are cached with the
  versions of the groups they read (a version counts a group's changes) and
  recomputed only when one of those changed (or updated by the units that
  moved, `_updated`, when few did), up to `_TERM_CACHE_BYTES` of cached
  terms. A group is solved again only when one of its terms changed
  since its last solve (its assignment would be the same), and the objective
  after a sweep is read off cached terms: `<A_L, P(B_L)>` is
  `sum_i term[i, perm[g][i]]` for a ref of group g on leaf L whose term is
  current (the last group of L visited in the sweep has one).
  """

  def __init__(self, spec: spec_lib.PermutationSpec, va: PyTree, vb: PyTree, lap_method: str):
    self.spec, self.lap_method = spec, lap_method
    self.names = list(spec.groups)
    as_f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    self.b = {p: as_f32(x) for p, x in tree.leaves_by_path(vb).items()}
    self.a = a = {p: as_f32(x) for p, x in tree.leaves_by_path(va).items()}
    self.by_path: dict[tuple[str, ...], list[tuple[str, spec_lib.AxisRef]]] = {}
    for g, refs in spec.groups.items():
      for r in refs:
        self.by_path.setdefault(r.path, []).append((g, r))
    self.varying: dict[str, list[tuple[spec_lib.AxisRef, tuple]]] = {g: [] for g in self.names}
    fixed_refs: dict[str, list[spec_lib.AxisRef]] = {g: [] for g in self.names}
    for g, refs in spec.groups.items():
      for r in refs:
        others = tuple((h, o) for h, o in self.by_path[r.path] if o != r)
        (self.varying[g].append((r, others)) if others else fixed_refs[g].append(r))
    # A's unit rows for every ref whose term is recomputed.
    self.rows_a = {r: unit_rows(a[r.path], r) for g in self.names for r, _ in self.varying[g]}
    self.a_varying = {p: a[p] for p, refs in self.by_path.items() if len(refs) > 1}
    self.fixed = {}
    for g in self.names:
      n = spec.sizes[g]
      total = np.zeros((n, n), np.float32)
      for r in fixed_refs[g]:
        total += _unit_products(unit_rows(a[r.path], r), unit_rows(self.b[r.path], r))
      self.fixed[g] = total
    self.constant = sum(float(np.vdot(x, self.b[p])) for p, x in a.items() if p not in self.by_path)
    # Who must be solved again when group h changes: the groups with a term reading h.
    self.readers = {h: {g for g in self.names for _, others in self.varying[g] for k, _ in others if k == h}
                    for h in self.names}
    self.cache: dict[spec_lib.AxisRef, tuple[tuple[int, ...], np.ndarray, tuple[np.ndarray, ...]]] = {}
    self.cached_bytes = 0

  def term(self, r: spec_lib.AxisRef, others: tuple, perm: dict, version: dict) -> np.ndarray:
    """f32[n, n]: A's units along r against B's, B permuted along `others`."""
    versions = tuple(version[h] for h, _ in others)
    used = tuple(perm[h] for h, _ in others)
    hit = self.cache.get(r)
    if hit is not None and hit[0] == versions:
      return hit[1]
    value = None if hit is None or len(others) > 1 else self._updated(r, others[0][1], hit[1], hit[2][0], used[0])
    if value is None:
      b = self.b[r.path]
      for (h, o), p in zip(others, used):
        b = permute.take_units(b, p, o)
      value = _unit_products(self.rows_a[r], unit_rows(b, r))
    if hit is not None:
      self.cached_bytes -= hit[1].nbytes
      del self.cache[r]
    if self.cached_bytes + value.nbytes <= _TERM_CACHE_BYTES:
      self.cache[r] = (versions, value, used)
      self.cached_bytes += value.nbytes
    return value

  def _updated(self, r: spec_lib.AxisRef, o: spec_lib.AxisRef, value: np.ndarray, was: np.ndarray,
               now: np.ndarray) -> np.ndarray | None:
    """r's term with B permuted along o by `now` instead of `was`, from its value
    at `was`: a rank update over the few units that moved (None when many did).

    The moved units' slices of A times the change of B's: n^2 * moved * m / n_o
    multiply-adds on the host instead of a whole product.
    """
    if o.factor is not None or o.part is not None or o.axis == r.axis:
      return None
    moved = np.flatnonzero(was != now)
    if len(moved) * _UPDATE_FRACTION > len(now):
      return None
    b = self.b[r.path]
    rows_a = unit_rows(np.take(self.a[r.path], moved, axis=o.axis), r)
    change = unit_rows(np.take(b, now[moved], axis=o.axis) - np.take(b, was[moved], axis=o.axis), r)
    return value + rows_a @ change.T

  def cost(self, g: str, perm: dict, version: dict) -> np.ndarray:
    """f32[n, n]: sum over g's refs of <A's unit i, B's unit j>, B's other axes permuted."""
    total = self.fixed[g].copy()
    for r, others in self.varying[g]:
      total += self.term(r, others, perm, version)
    return total

  def objective(self, perm: dict, version: dict) -> float:
    """`sum_leaves <A, P(B)>` at `perm`, from current cached terms where there are."""
    total = self.constant + sum(float(self.fixed[g][np.arange(len(p)), p].sum(dtype=np.float64))
                                for g, p in perm.items())
    for path, a in self.a_varying.items():
      refs = self.by_path[path]
      for g, r in refs:
        hit = self.cache.get(r)
        current = hit is not None and hit[0] == tuple(version[h] for h, o in refs if o != r)
        if current and sum(h == g for h, _ in refs) == 1:
          total += float(hit[1][np.arange(len(perm[g])), perm[g]].sum(dtype=np.float64))
          break
      else:
        b = self.b[path]
        for h, o in refs:
          b = permute.take_units(b, perm[h], o)
        total += float(np.vdot(a, b))
    return total

  def run(self, orders: np.ndarray, perm: dict, tol: float):
    """Sweeps from `perm` (group -> int32[n]) in `orders` (int32[max_sweeps, groups]) until a
    stopping rule; (perm, objectives, pair scores)."""
    version = {g: 0 for g in self.names}
    stale = set(self.names)
    history: list[float] = []
    prev, obj, improved = -np.inf, -np.inf, True
    while len(history) < len(orders) and improved and (len(history) < 2 or obj - prev > tol * abs(prev)):
      improved = False
      for k in orders[len(history)]:
        g = self.names[k]
        if g not in stale:
          continue  # no term of g changed since its last solve: the same assignment
        stale.discard(g)
        c = self.cost(g, perm, version)
        new = _host_assignment(c, self.lap_method)
        rows = np.arange(c.shape[0])
        old_score, new_score = c[rows, perm[g]].sum(), c[rows, new].sum()
        # Git Re-Basin's progress test, at float32 resolution.
        improved |= bool(new_score > old_score + 1e-6 * abs(old_score))
        if not np.array_equal(new, perm[g]):
          perm[g], version[g] = new, version[g] + 1
          stale |= self.readers[g]
      prev, obj = obj, self.objective(perm, version)
      history.append(obj)
    scores = {}
    for g in self.names:
      c = self.cost(g, perm, version)
      scores[g] = c[np.arange(c.shape[0]), perm[g]]
    return perm, np.asarray(history, np.float32), scores


@functools.lru_cache(maxsize=32)
def _pair_scores(key: tuple) -> Callable[[Perm, PyTree, PyTree], dict[str, jax.Array]]:
  """Compiled once per spec: each group's similarity of its matched pairs."""
  costs = _WeightCosts(_spec_from_key(key))

  @jax.jit
  def scores(perm, va, vb):
    a, b = tree.leaves_by_path(va), tree.leaves_by_path(vb)
    out = {}
    for g in costs.names:
      c = costs.cost(g, perm, a, b)
      out[g] = c[jnp.arange(c.shape[0]), perm[g]]
    return out

  return scores


def _spec_key(spec: spec_lib.PermutationSpec) -> tuple:
  """A hashable stand-in for a spec, so compiled loops are reused."""
  return tuple((g, spec.sizes[g], tuple(refs)) for g, refs in spec.groups.items())


def _spec_from_key(key: tuple) -> spec_lib.PermutationSpec:
  return spec_lib.PermutationSpec({g: refs for g, _, refs in key}, {g: n for g, n, _ in key})


@functools.lru_cache(maxsize=32)
def _weight_matching_loop(key: tuple, lap_method: str, tol: float):
  """`weight_matching`'s sweeps as one program (accelerators, `ste_matching`'s step):
  (int32[max_sweeps, groups] orders, perm, va, vb) -> (perm, f32[max_sweeps] objectives, sweeps run)."""
  spec = _spec_from_key(key)
  costs = _WeightCosts(spec)
  names = costs.names

  def objective(perm, a, b):
    total = jnp.float32(0)
    vb_p = _permuted_leaves(spec, perm, b)
    for path, leaf in a.items():
      total += jnp.vdot(jnp.asarray(leaf, jnp.float32), jnp.asarray(vb_p[path], jnp.float32))
    return total

  def branch(g):
    def update(args):
      perm, a, b = args
      c = costs.cost(g, perm, a, b)
      new = lap(c, maximize=True, method=lap_method).astype(jnp.int32)
      rows = jnp.arange(c.shape[0])
      old_score, new_score = c[rows, perm[g]].sum(), c[rows, new].sum()
      # Git Re-Basin's progress test: this group's own objective rose.
      improved = new_score > old_score + 1e-6 * jnp.abs(old_score)
      return {**perm, g: new}, improved
    return update

  branches = [branch(g) for g in names]

  @jax.jit
  def run(orders, perm, va, vb):
    a, b = tree.leaves_by_path(va), tree.leaves_by_path(vb)
    max_sweeps = orders.shape[0]

    def sweep(state):
      s, perm, _, obj, history, _ = state
      order = orders[s]

      def visit(k, carry):
        perm, improved = carry
        perm, better = jax.lax.switch(order[k], branches, (perm, a, b))
        return perm, improved | better

      perm, improved = jax.lax.fori_loop(0, len(names), visit, (perm, jnp.bool_(False)))
      new = objective(perm, a, b)
      return s + 1, perm, obj, new, history.at[s].set(new), improved

    def keep_going(state):
      s, _, prev, obj, _, changed = state
      return (s < max_sweeps) & changed & ((s < 2) | (obj - prev > tol * jnp.abs(prev)))

    start = objective(perm, a, b)
    history = jnp.zeros(max_sweeps, jnp.float32)
    state = (jnp.int32(0), perm, -jnp.inf, start, history, jnp.bool_(True))
    s, perm, _, _, history, _ = jax.lax.while_loop(keep_going, sweep, state)
    return perm, history, s

  return run


class _Feature(NamedTuple):
  """Where a group's units appear in a kernel's input (or output).

  `summed` are the data's other axes that belong to groups: model B's units
  along them are permuted, so they are summed out (a sum is invariant to
  permutation) rather than kept as sample positions. With a factored axis the
  view's other components are summed out likewise where another group
  permutes them (`sum_view`: heads and head_dim), and are positions otherwise
  (the spatial positions of a flatten).
  """

  group: str
  path: tuple[str, ...]
  use: int
  axis: int
  factor: tuple[tuple[int, ...], int] | None
  is_output: bool
  summed: tuple[int, ...]
  sum_view: bool
  part: tuple[int, int] | None = None


def feature_plan(spec: spec_lib.PermutationSpec, uses: Mapping) -> list[_Feature]:
  """Each group's features: kernels' inputs along its axes, else their outputs.

  Args:
    spec: the permutation groups.
    uses: {kernel path: [trace.KernelUse]}, e.g. `traced_kernel_uses`'s.

  Returns:
    One feature a (group, kernel use, data axis), groups in spec order: the
    inputs of every kernel use that contracts one of the group's axes, or,
    for a group no kernel reads, the outputs that carry it. A feature says
    which use's array to read (`path`, `use`, `is_output`) and how
    `feature_rows` cuts it into the group's units.
  """
  by_axis: dict[tuple, list[tuple[str, Any]]] = {}
  for g, rs in spec.groups.items():
    for r in rs:
      by_axis.setdefault((r.path, r.axis), []).append((g, r.factor, r.part))
  plan = {g: ([], []) for g in spec.groups}
  for path, kernel_uses in uses.items():
    for k, use in enumerate(kernel_uses):
      for is_output, pairs in ((False, use.input_axes), (True, use.output_axes)):
        grouped = [d for d, ka in pairs if (path, ka) in by_axis]
        for data_axis, kernel_axis in pairs:
          summed = tuple(d for d in grouped if d != data_axis)
          claims = by_axis.get((path, kernel_axis), [])
          for g, factor, part in claims:
            same_part = [c for c in claims if c[2] == part]
            plan[g][is_output].append(
                _Feature(g, path, k, data_axis, factor, is_output, summed, len(same_part) > 1, part))
  return [f for g in spec.groups for f in (plan[g][0] or plan[g][1])]


def feature_rows(x: jax.Array, feature: _Feature) -> jax.Array:
  """A kernel use's input (or output) cut into one group's units.

  Args:
    x: f32[batch, ...]: the array `feature` names (its use's input, or its
      output when `feature.is_output`).
    feature: one entry of `feature_plan`.

  Returns:
    f32[batch, positions, n]: the group's n units last; the axes other
    groups permute summed out, every other axis flattened into positions.
  """
  x = jnp.asarray(x, jnp.float32)
  axis = feature.axis - sum(d < feature.axis for d in feature.summed)
  x = jnp.moveaxis(x.sum(axis=feature.summed), axis, -1)
  if feature.part is not None:
    x = x[..., feature.part[0]:feature.part[1]]
  if feature.factor is not None:
    view, index = feature.factor
    x = jnp.moveaxis(x.reshape(x.shape[:-1] + tuple(view)), x.ndim - 1 + index, -1)
    if feature.sum_view:
      x = x.sum(axis=tuple(range(x.ndim - len(view), x.ndim - 1)))
  return x.reshape(x.shape[0], -1, x.shape[-1])


@_many
def activation_matching(
    spec: spec_lib.PermutationSpec,
    apply_fn: Callable[..., Any],
    va: PyTree,
    vb: PyTree,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    lap_method: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> MatchResult:
  """Git Re-Basin's activation matching, from streamed cross-correlations.

  A group's features are the inputs of every kernel that contracts one of the
  group's axes (all the layers reading a residual stream, say), captured from
  both models on the same batches; groups no kernel reads (the query/key
  head_dim of Flax attention) use the kernels' outputs instead. Their
  cross-correlations, summed over the group's features, are accumulated in one
  sharded pass (`mergejax.stats`), and each group is one linear assignment.

  Args:
    spec: the permutation groups.
    apply_fn: `apply_fn(variables, x)`, e.g. a Flax `model.apply` in eval mode.
    va: the reference model's variables.
    vb: the model to align (or a sequence of models).
    batches: inputs (DESIGN.md, batches).
    lap_method: `mergejax.lap`'s method.
    mesh: devices to shard the pass over (default: every device of every process, `distributed.default_mesh()`).
    progress: log the pass's progress.

  A spec with batched groups (layers under `scan`) is matched copy by copy:
  the scans over variables are unrolled (`trace.kernel_uses(...,
  unroll_scans=True)`), each copy's kernels are keyed by their per-copy path,
  the groups are those of `stacked.unstack`'s flat spec (every scanned
  kernel cut into its copies), and the perm and pair scores come back
  stacked ([L, n]): the unrolled model's result.

  Returns:
    MatchResult; `objective_trace` holds one entry, the sum of the matched
    pairs' scores over all groups; `pair_scores[g]` each pair's correlation,
    averaged over the group's features (so in [-1, 1]).
  """
  _check_models(spec, va, vb)
  example, batches = distributed.peek_any_process(mesh, peek, batches, "activation_matching")
  unroll = bool(spec.batch_sizes)
  uses = traced_kernel_uses(apply_fn, va, example, unroll)
  batched, spec = spec, flat_spec(spec, va, uses) if unroll else spec
  plan = feature_plan(spec, uses)
  missing = sorted(g for g in set(spec.groups) - {f.group for f in plan} if spec.sizes[g] > 1)
  if missing:
    raise ValueError(f"activation_matching: no kernel reads or writes groups {missing}")

  def features(variables, x):
    _, found = trace.kernel_uses(apply_fn, unroll_scans=unroll)(variables, x)
    return [feature_rows((found[f.path][f.use].output if f.is_output else found[f.path][f.use].input), f)
            for f in plan]

  moments = stats.accumulate(stats.cross_moments(features), (va, vb), batches, mesh=mesh, progress=progress)
  # A group of one unit that no leaf names (the zoo keeps such groups by name) matches itself.
  corr = {g: jnp.ones((1, 1), jnp.float32) if not spec.groups[g] and spec.sizes[g] == 1
          else jnp.zeros((spec.sizes[g],) * 2, jnp.float32) for g in spec.groups}
  for f, m in zip(plan, moments):
    corr[f.group] = corr[f.group] + m.correlation / sum(e.group == f.group for e in plan)
  perm = {g: lap(c, maximize=True, method=lap_method).astype(jnp.int32) for g, c in corr.items()}
  scores = {g: corr[g][jnp.arange(spec.sizes[g]), perm[g]] for g in spec.groups}
  total = sum(s.sum() for s in scores.values())
  if unroll:
    perm, scores = stacked.stack_permutation(batched, perm), stacked.stack_permutation(batched, scores)
  return _replicated_like(MatchResult(perm, jnp.reshape(total, (1,)), scores), va)


def flat_spec(spec: spec_lib.PermutationSpec, variables: PyTree, uses: Mapping) -> spec_lib.PermutationSpec:
  """`stacked.unstack`'s flat spec, cutting every kernel the unrolled scans read by copy (`path + (l,)`).

  `uses`: `traced_kernel_uses(..., unroll_scans=True)` of the model.
  """
  return stacked.unstack(spec, variables, stacked=stacked.scanned_copies(variables, uses))[0]


def peek(batches) -> tuple[Any, Any]:
  """The first batch's input, and batches to iterate from the start again."""
  if callable(batches):
    first = next(iter(batches()), None)
  else:
    iterator = iter(batches)
    first = next(iterator, None)
    batches = itertools.chain([first], iterator) if iterator is batches else batches
  if first is None:
    raise ValueError("batches is empty")
  return (first[0] if isinstance(first, (tuple, list)) else first), batches


def traced_kernel_uses(apply_fn: Callable[..., Any], variables: PyTree, example: Any,
                       unroll_scans: bool = False) -> dict:
  """The kernels' uses in `apply_fn(variables, example)`, from one abstract trace.

  Args:
    apply_fn: `apply_fn(variables, x)`.
    variables: the model's variables (arrays or `jax.ShapeDtypeStruct`s).
    example: one input x (its shapes are all that is read; nothing runs).
    unroll_scans: key copy l of a kernel stacked under a `scan` as its own
      kernel, as `trace.kernel_uses(..., unroll_scans=True)` does.

  Returns:
    {kernel path: [trace.KernelUse]}, `trace.kernel_uses`'s second output
    with abstract arrays.
  """
  found = {}

  def probe(v, x):
    _, uses = trace.kernel_uses(apply_fn, unroll_scans=unroll_scans)(v, x)
    found.update(uses)
    return 0

  jax.eval_shape(probe, variables, example)
  return found


@_many
def ste_matching(
    spec: spec_lib.PermutationSpec,
    loss_fn: Callable[[PyTree, Any], jax.Array],
    va: PyTree,
    vb: PyTree,
    batches: Iterable[Any],
    *,
    num_steps: int,
    optimizer: optax.GradientTransformation | None = None,
    key: jax.Array | None = None,
    lap_method: str = "auto",
) -> MatchResult:
  """Git Re-Basin's straight-through estimator.

  Learns weights W (initialised to `va`) such that the midpoint of `va` and
  `vb` permuted to match W has a low loss: each step weight-matches `vb` to W
  (warm-started from the last step's permutation), and the gradient of
  `loss_fn(0.5 * (va + P(vb)))` with respect to the projection P(vb) updates W
  (straight through the projection).

  Args:
    spec: the permutation groups.
    loss_fn: `loss_fn(variables, batch) -> f32[]`, e.g. cross-entropy.
    va: the reference model's variables.
    vb: the model to align (or a sequence of models).
    batches: batches for `loss_fn`, cycled for `num_steps` steps.
    num_steps: optimisation steps.
    optimizer: default `optax.adam(1e-3)`.
    key: the group order of the inner weight matching.
    lap_method: `mergejax.lap`'s method.

  Several processes (`jax.distributed`): each passes its own batches and
  every step's gradient is the mean of the processes' gradients weighted by
  their batches' rows (a host all-gather of the gradients), so for a
  `loss_fn` that is a mean over the batch's rows (leading axis of its first
  leaf) the result is one process's on each step's batches concatenated, the
  same on every process. Every process needs batches (checked on every
  process before the first step).

  Returns:
    MatchResult; `objective_trace` is the loss at each step; replicated over
    the mesh of `va`'s first sharded leaf, if any.
  """
  _check_models(spec, va, vb)
  stacked.check_unbatched(spec, "ste_matching")
  if num_steps < 1:
    raise ValueError(f"num_steps must be at least 1, got {num_steps}")
  optimizer = optax.adam(1e-3) if optimizer is None else optimizer
  key = jax.random.key(0) if key is None else key
  match = _weight_matching_loop(_spec_key(spec), lap_method, 1e-7)
  # Each step's inner weight matching: at most 20 sweeps, in these orders.
  orders = _sweep_orders(key, len(spec.groups), 20 * num_steps).reshape(num_steps, 20, len(spec.groups))

  @jax.jit
  def gradient(w, perm, orders, batch):
    perm, _, _ = match(orders, perm, w, vb)
    projected = permute.apply_permutation(spec, perm, vb)

    def loss(w):
      straight = jax.tree.map(lambda p, w: w + jax.lax.stop_gradient(p - w), projected, w)
      return loss_fn(tree.lerp(va, straight, 0.5), batch)

    value, grads = jax.value_and_grad(loss)(w)
    return perm, value, grads

  @jax.jit
  def descend(w, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, w)
    return optax.apply_updates(w, updates), opt_state

  w = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), va)
  opt_state = optimizer.init(w)
  perm = permute.identity_permutation(spec)
  losses = []
  stream = _cycle(batches)
  several = jax.process_count() > 1
  if several:  # an empty shard raises on every process, before any step's all-gather
    batch, error = None, None
    try:
      batch = next(stream)
    except ValueError as e:
      error = e
    distributed.raise_together(distributed.default_mesh(), error, "ste_matching")
    stream = itertools.chain([batch], stream)
  for step in range(num_steps):
    batch = next(stream)
    perm, value, grads = gradient(w, perm, orders[step], batch)
    if several:
      value, grads = _mean_over_processes((value, grads), jax.tree.leaves(batch)[0].shape[0])
    w, opt_state = descend(w, opt_state, grads)
    losses.append(value)
  scores = _pair_scores(_spec_key(spec))(perm, va, vb)
  return _replicated_like(MatchResult(perm, jnp.stack(losses), scores), va)


def _mean_over_processes(values: PyTree, rows: int) -> PyTree:
  """The mean of every process's `values` (means over its `rows` rows), weighted by rows:
  the mean over all the processes' rows, the same on every process."""
  every_rows, every_values = multihost_utils.process_allgather((np.float32(rows), values))
  weights = every_rows / every_rows.sum()
  return jax.tree.map(lambda v: jnp.asarray(np.tensordot(weights, v, axes=1), v.dtype), every_values)


def _cycle(batches):
  while True:
    empty = True
    for batch in (batches() if callable(batches) else batches):
      empty = False
      yield batch
    if empty:
      raise ValueError("ste_matching: batches is empty")
