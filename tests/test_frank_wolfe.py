"""Tests for mergejax.merge.frank_wolfe (FW-merging) against a NumPy Frank-Wolfe on a convex toy.

The toy: task j's loss is ||theta - c_j||^2 over the whole tree, its one batch
is c_j, and the pool is the task vectors c_k - base. Then f = sum_j ||theta -
c_j||^2 is minimised over conv{c_k} at the centres' mean, the gradient is
2 sum_j (theta - c_j), and exact line search has a closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mergejax as mj

SHAPES = {"dense": {"kernel": (3, 2), "bias": (2,)}, "scale": ()}


def _tree(rng):
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), SHAPES,
                      is_leaf=lambda s: isinstance(s, tuple))


def _flat(t):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])


def _squared_distance(variables, centre):
  return sum(jnp.sum(jnp.square(v - c)) for v, c in zip(jax.tree.leaves(variables), jax.tree.leaves(centre)))


@pytest.fixture(scope="module")
def toy():
  rng = np.random.default_rng(0)
  base = _tree(rng)
  centres = [_tree(rng) for _ in range(4)]
  pool = [mj.tree.sub(c, base) for c in centres]
  return base, centres, pool, [[c] for c in centres]


def numpy_fw(base, vertices, centres, steps, *, step_size="harmonic", step_scale=1.0):
  """FW-Hard on f = sum_j ||theta - c_j||^2 (c: `centres`) over conv{vertices}, in float64."""
  base, c = _flat(base), np.stack([_flat(x) for x in centres])
  taus = np.stack([_flat(x) for x in vertices]) - base
  theta, chosen, gammas, losses, gaps = base.copy(), [], [], [], []
  objective = lambda th: float(np.sum((th - c) ** 2))
  for t in range(steps):
    grads = 2 * (theta - c)  # each task's gradient
    g = grads.sum(0)
    losses.append(objective(theta))
    picks = [int(np.argmin(taus @ g))]
    vertex = base + taus[picks[0]]
    e = vertex - theta
    gaps.append(float(g @ (theta - vertex)))
    if step_size == "harmonic":
      gamma = step_scale * 2 / (t + 2)
    elif e @ e == 0:  # at the vertex already: f is flat along e
      gamma = 0.0
    else:  # argmin_gamma sum_j ||theta + gamma e - c_j||^2 on [0, 1]
      gamma = float(np.clip(-(g @ e) / (2 * len(c) * (e @ e)), 0, 1))
    theta = theta + gamma * e
    chosen.append(tuple(picks))
    gammas.append(gamma)
  losses.append(objective(theta))
  return theta, chosen, np.array(gammas), np.array(losses), np.array(gaps)


@pytest.mark.parametrize("step_size, step_scale, num_tasks", [
    ("harmonic", 1.0, 4), ("harmonic", 0.5, 4), ("line_search", 1.0, 4), ("line_search", 1.0, 2),
])
def test_matches_numpy_frank_wolfe_and_decreases_the_objective(toy, step_size, step_scale, num_tasks):
  """The first `num_tasks` centres give the losses; all four are the pool's vertices."""
  base, vertices, pool, data = toy
  centres, data = vertices[:num_tasks], data[:num_tasks]
  steps = 6
  merged, trace = mj.merge.fw_merge(_squared_distance, base, pool, data, steps=steps,
                                    step_size=step_size, step_scale=step_scale)
  theta, chosen, gammas, losses, gaps = numpy_fw(base, vertices, centres, steps, step_size=step_size,
                                                 step_scale=step_scale)
  assert trace.chosen == chosen
  assert [w.tolist() for w in trace.weights] == [[g] for g in trace.step_sizes]
  # Line search bisects [0, 1] 20 times: a bracket 2^-20 ~ 9.5e-7 wide.
  np.testing.assert_allclose(trace.step_sizes, gammas, atol=1e-6 if step_size == "line_search" else 0)
  np.testing.assert_allclose(_flat(merged), theta, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(trace.losses, losses, rtol=1e-5)
  np.testing.assert_allclose(trace.gaps, gaps, rtol=1e-5, atol=1e-4)
  assert trace.losses[-1] < trace.losses[0]
  if step_size == "line_search":  # exact line search never goes up
    assert np.all(np.diff(trace.losses) <= 1e-5 * trace.losses[:-1])
  # The FW gap bounds the distance to the optimum over the hull (the centres' mean), f convex.
  optimum = float(np.sum((np.mean([_flat(c) for c in centres], 0) - np.stack([_flat(c) for c in centres])) ** 2))
  assert np.all(trace.gaps >= trace.losses[:-1] - optimum - 1e-4)


def numpy_fw_soft(base, vertices, centres, steps, *, leaves=None):
  """FW-Soft on f = sum_j ||theta - c_j||^2 with exact weights, in float64.

  Each task j picks the vertex minimising <grad_j, tau_k> among those not yet picked; the weights minimise
  f(theta + D lam) = J ||D lam - (mean_j c_j - theta)||^2 + const (D's columns s_j - theta): least squares,
  over the whole vector (task-wise) or separately on each slice of `leaves` (layer-wise: f is a sum over
  leaves). Returns (theta, chosen, weights, losses).
  """
  base, c = _flat(base), np.stack([_flat(x) for x in centres])
  taus = np.stack([_flat(x) for x in vertices]) - base
  theta, chosen, weights, losses = base.copy(), [], [], []
  for _ in range(steps):
    losses.append(float(np.sum((theta - c) ** 2)))
    picks = []
    for gj in 2 * (theta - c):
      scores = taus @ gj
      scores[picks] = np.inf
      picks.append(int(np.argmin(scores)))
    d, target = (base + taus[picks] - theta).T, c.mean(0) - theta
    if leaves is None:
      lam = np.linalg.lstsq(d, target, rcond=None)[0]
      theta = theta + d @ lam
    else:
      lam = np.stack([np.linalg.lstsq(d[sl], target[sl], rcond=None)[0] for sl in leaves], axis=1)
      theta = theta + np.concatenate([d[sl] @ lam[:, i] for i, sl in enumerate(leaves)])
    chosen.append(tuple(picks))
    weights.append(lam)
  losses.append(float(np.sum((theta - c) ** 2)))
  return theta, chosen, weights, np.array(losses)


def _leaf_slices(t):
  ends = np.cumsum([np.size(x) for x in jax.tree.leaves(t)])
  return [slice(e - np.size(x), e) for e, x in zip(ends, jax.tree.leaves(t))]


@pytest.fixture(scope="module")
def off_hull():
  """Three tasks whose centres lie off the hull of four vertices: FW-Soft picks three of them per step."""
  rng = np.random.default_rng(5)  # the picks' alignment scores are >= 2 apart: no near-ties
  base, vertices, centres = _tree(rng), [_tree(rng) for _ in range(4)], [_tree(rng) for _ in range(3)]
  return base, vertices, centres, [mj.tree.sub(v, base) for v in vertices], [[c] for c in centres]


# Plain gradient descent on the weights' quadratic converges to its least-squares minimiser (the learning
# rate is under 1 / the Hessian's largest eigenvalue on both toys, about 435).
EXACT = {"optimizer": optax.sgd, "learning_rate": 0.002, "steps": 3000, "init": 0.0}


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_soft_weights_are_the_least_squares_minimiser(off_hull, granularity):
  base, vertices, centres, pool, data = off_hull
  leaves = None if granularity == "task" else _leaf_slices(base)
  merged, trace = mj.merge.fw_merge(_squared_distance, base, pool, data, steps=3, variant="soft",
                                    soft={**EXACT, "granularity": granularity})
  theta, chosen, weights, losses = numpy_fw_soft(base, vertices, centres, 3, leaves=leaves)
  assert trace.chosen == chosen
  assert len({k for picks in chosen for k in picks}) == 4  # the picks change between steps
  for got, want in zip(trace.weights, weights):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(trace.step_sizes, [w.sum(0).mean() for w in weights], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_flat(merged), theta, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(trace.losses, losses, rtol=1e-4)
  assert np.all(np.diff(trace.losses) <= 0)  # each step minimises f over a span holding the current point


@pytest.mark.parametrize("step_size", ["harmonic", "line_search"])
def test_soft_with_every_vertex_picked_ends_no_higher_than_hard(toy, step_size):
  """Every vertex picked: a soft step minimises f over the affine hull of theta and the pool, which holds the
  hard step's segment; on the toy (centres = vertices) that minimiser is the centres' mean, f's optimum."""
  base, centres, pool, data = toy
  _, soft = mj.merge.fw_merge(_squared_distance, base, pool, data, steps=4, variant="soft", soft=EXACT)
  _, hard = mj.merge.fw_merge(_squared_distance, base, pool, data, steps=4, step_size=step_size)
  c = np.stack([_flat(x) for x in centres])
  optimum = float(np.sum((c.mean(0) - c) ** 2))
  assert np.all(soft.losses[1:] <= hard.losses[1:] + 1e-4 * hard.losses[1:])
  np.testing.assert_allclose(soft.losses[1:], optimum, rtol=1e-4)
  assert hard.losses[-1] > optimum * (1 + 1e-3)  # hard has not got there in 4 steps


def test_first_harmonic_step_lands_on_the_chosen_fine_tuned_model(toy):
  base, centres, pool, data = toy
  merged, trace = mj.merge.fw_merge(_squared_distance, base, pool, data, steps=1)
  assert trace.step_sizes.tolist() == [1.0]
  (k,), = trace.chosen
  np.testing.assert_allclose(_flat(merged), _flat(centres[k]), rtol=1e-6, atol=1e-6)
  # init defaults to the base; another init starts elsewhere (and keeps its dtypes).
  same, _ = mj.merge.fw_merge(_squared_distance, base, pool, data, steps=1, init=base)
  np.testing.assert_array_equal(_flat(same), _flat(merged))
  start = centres[0]
  _, from_start = mj.merge.fw_merge(_squared_distance, base, pool, data, steps=1, init=start)
  assert from_start.losses[0] == pytest.approx(float(sum(_squared_distance(start, c) for c in centres)), rel=1e-6)


def test_oracle_picks_the_argmin_of_the_alignment():
  rng = np.random.default_rng(1)
  g = _tree(rng)
  pool = [_tree(rng) for _ in range(6)]
  dots = np.array([_flat(g) @ _flat(t) for t in pool])
  np.testing.assert_allclose(mj.merge.fw_alignments(g, pool), dots, rtol=1e-5)
  assert mj.merge.fw_select(g, pool) == int(np.argmin(dots))
  first = int(np.argmin(dots))
  masked = dots.copy()
  masked[first] = np.inf
  assert mj.merge.fw_select(g, pool, exclude=[first]) == int(np.argmin(masked))
  # Cosine: the sum over leaves of each leaf's cosine (a zero leaf contributes 0).
  pool[2] = {**pool[2], "scale": np.float32(0)}
  leaves = lambda t: [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]
  cos = lambda a, b: 0.0 if not (a.any() and b.any()) else a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  cosines = np.array([sum(cos(a, b) for a, b in zip(leaves(g), leaves(t))) for t in pool])
  np.testing.assert_allclose(mj.merge.fw_alignments(g, pool, alignment="cosine"), cosines, rtol=1e-5, atol=1e-6)
  assert mj.merge.fw_select(g, pool, alignment="cosine") == int(np.argmin(cosines))


def test_bad_inputs_fail_before_any_loss_is_computed(toy):
  base, _, pool, data = toy

  def loss_fn(variables, batch):
    raise AssertionError("loss_fn was called")

  fw = lambda **kw: mj.merge.fw_merge(loss_fn, **{"base": base, "pool": pool, "data": data, "steps": 2, **kw})
  wider = {**pool[1], "dense": {"kernel": np.zeros((4, 2), np.float32), "bias": np.zeros(2, np.float32)}}
  nan = {**base, "scale": np.float32(np.nan)}
  cases = [
      (dict(pool=[]), "pool: need at least one task vector"),
      (dict(pool=[pool[0], wider]), r"pool\[1\] does not match base: .*dense/kernel"),
      (dict(data=[]), "data is empty"),
      (dict(data=[data[0], []]), r"data\[1\] has no batches"),
      (dict(steps=0), "steps must be an integer >= 1"),
      (dict(steps=1.5), "steps must be an integer"),
      (dict(variant="medium"), "variant must be one of"),
      (dict(alignment="angle"), "alignment must be one of"),
      (dict(step_size="fixed"), "step_size must be one of"),
      (dict(step_scale=0.0), r"step_scale must be in \(0, 1\]"),
      (dict(step_scale=1.5), r"step_scale must be in \(0, 1\]"),
      (dict(line_search_iterations=0), "line_search_iterations must be an integer >= 1"),
      (dict(init=wider), "init does not match base: .*dense/kernel"),
      (dict(base=nan, pool=[mj.tree.sub(p, p) for p in pool]), "base: scale has 1 NaN"),
      (dict(init=nan), "init: scale has 1 NaN"),
      (dict(soft={"steps": 5}), "with variant='hard'"),
      (dict(variant="soft", soft={"stepz": 5}), r"soft: unknown keys \['stepz'\]"),
      (dict(variant="soft", soft={"steps": -1}), "steps must be an integer >= 0"),
      (dict(variant="soft", soft={"granularity": "row"}), "granularity must be one of"),
      (dict(variant="soft", soft={"init": [0.3]}), "init"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      fw(**kwargs)
  with pytest.raises(ValueError, match="loss_fn must be a callable"):
    mj.merge.fw_merge(None, base, pool, data, steps=1)
  with pytest.raises(ValueError, match="leaves none of the 4"):
    mj.merge.fw_select(base, pool, exclude=[0, 1, 2, 3])
  with pytest.raises(ValueError, match="exclude holds 7"):
    mj.merge.fw_select(base, pool, exclude=[7])
