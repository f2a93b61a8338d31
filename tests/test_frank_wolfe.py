"""Tests for mergejax.merge.frank_wolfe (FW-merging) against a NumPy Frank-Wolfe on a convex toy.

The toy: task j's loss is ||theta - c_j||^2 over the whole tree, its one batch
is c_j, and the pool is the task vectors c_k - base. Then f = sum_j ||theta -
c_j||^2 is minimised over conv{c_k} at the centres' mean, the gradient is
2 sum_j (theta - c_j), and exact line search has a closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
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


def numpy_fw(base, vertices, centres, steps, *, variant="hard", step_size="harmonic", step_scale=1.0):
  """Frank-Wolfe on f = sum_j ||theta - c_j||^2 (c: `centres`) over conv{vertices}, in float64."""
  base, c = _flat(base), np.stack([_flat(x) for x in centres])
  taus = np.stack([_flat(x) for x in vertices]) - base
  theta, chosen, gammas, losses, gaps = base.copy(), [], [], [], []
  objective = lambda th: float(np.sum((th - c) ** 2))
  for t in range(steps):
    grads = 2 * (theta - c)  # each task's gradient
    g = grads.sum(0)
    losses.append(objective(theta))
    if variant == "hard":
      picks = [int(np.argmin(taus @ g))]
    else:
      picks = []
      for gj in grads[:len(taus)]:
        scores = taus @ gj
        scores[picks] = np.inf
        picks.append(int(np.argmin(scores)))
    vertex = base + taus[picks].mean(0)
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


@pytest.mark.parametrize("variant, step_size, step_scale, num_tasks", [
    ("hard", "harmonic", 1.0, 4), ("hard", "harmonic", 0.5, 4), ("hard", "line_search", 1.0, 4),
    ("hard", "line_search", 1.0, 2), ("soft", "harmonic", 1.0, 2), ("soft", "line_search", 1.0, 2),
])
def test_matches_numpy_frank_wolfe_and_decreases_the_objective(toy, variant, step_size, step_scale, num_tasks):
  """The first `num_tasks` centres give the losses; all four are the pool's vertices."""
  base, vertices, pool, data = toy
  centres, data = vertices[:num_tasks], data[:num_tasks]
  steps = 6
  merged, trace = mj.merge.fw_merge(_squared_distance, base, pool, data, steps=steps, variant=variant,
                                    step_size=step_size, step_scale=step_scale)
  theta, chosen, gammas, losses, gaps = numpy_fw(base, vertices, centres, steps, variant=variant, step_size=step_size,
                                                 step_scale=step_scale)
  assert trace.chosen == chosen
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
      (dict(pool=[]), "pool is empty"),
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
