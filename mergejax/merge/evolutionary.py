"""Evolutionary merging: M2N2 (Abrantes, Lange & Tang, "Competition and
Attraction Improve Model Fusion", GECCO 2025, arXiv 2508.16204).

A population of models of one architecture (a zoo model trained from
different seeds or on different label subsets; align them first, e.g. with
`mj.weight_matching`, when they do not share a base) evolves in an archive of
fixed size. Each generation makes one child from two parents and the child
competes with the archive for a place:

    best, history = mj.merge.evolve(model.apply, models, (x_val, y_val),
                                    generations=200, key=jax.random.key(0))

The paper's three ideas, each a small pure function here:

1. Evolving merge boundaries (`split_merge`): the parameters, read as one
   sequence (the leaves in tree order, each flattened), are cut at a split
   point s drawn in [0, P]; before it the child is r a + (1 - r) b, after it
   (1 - r) a + r b, with the ratio r drawn in [0, 1]. No layer boundary is
   fixed in advance.
2. Diversity by resource competition (`shared_fitness`): example j holds a
   resource of capacity c_j shared among the models that solve it,

       z_j = sum_k s_kj,    f_i = sum_j c_j s_ij / (z_j + eps) ** alpha,

   so a model that alone solves a few examples keeps a high fitness and
   specialists survive (alpha = 0 is the plain sum of scores).
3. Attraction-based mate choice (`attraction`): the second parent is drawn in
   proportion to how well it does where the first does badly, weighted by how
   scarce each example's resource is,

       g_k = sum_j c_j / (z_j + eps) * max(s_kj - s_aj, 0).

The first parent is drawn in proportion to shared fitness. The child replaces
the archive member (or is itself discarded) with the lowest shared fitness
among the archive and the child, except that the candidate with the best mean
score is never dropped (elitism), so the best mean score never decreases.

Scores s_ij >= 0 are per example (1 for a correct prediction with data
`(x, y)`). A whole generation (selection, merge, scoring, replacement) is one
jitted function of the stacked archive, so it compiles once whatever the
split point, ratio or number of generations (and once across calls with the
same apply_fn or score_fn, shapes and settings); the run is deterministic
from its key.
"""

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mergejax.merge.average import check_models

PyTree = Any
ScoreFn = Callable[[PyTree], jax.Array]

MATE_CHOICES = ("attraction", "random")


class EvolutionHistory(NamedTuple):
  """What happened in each of G generations of `evolve` (A: archive size).

  best_score: f32[G + 1], the archive's best mean score before generation 0
    and after each generation (non-decreasing).
  child_score: f32[G], each child's mean score.
  parents: int32[G, 2], the archive slots of the two parents.
  split: int32[G], the split point in [0, P] (P: parameters per model).
  ratio: f32[G], the mixing ratio in [0, 1].
  dropped: int32[G], the candidate dropped: an archive slot, or A for the child.
  archive_scores: f32[A], the final archive's mean scores.
  """

  best_score: np.ndarray
  child_score: np.ndarray
  parents: np.ndarray
  split: np.ndarray
  ratio: np.ndarray
  dropped: np.ndarray
  archive_scores: np.ndarray


def num_parameters(variables: PyTree) -> int:
  """P: the length of the parameter sequence that `split_merge` cuts."""
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(variables)))


def split_merge(
    a: PyTree, b: PyTree, split: jax.typing.ArrayLike, ratio: jax.typing.ArrayLike
) -> PyTree:
  """M2N2's merge of two parents cut at a split point (see the module).

  Element p of the parameter sequence (leaves in tree order, each flattened
  in row-major order) is r a_p + (1 - r) b_p if p < split, else
  (1 - r) a_p + r b_p. split = P with r = 1 is a, split = 0 with r = 1 is b.

  Args:
    a, b: two trees of the same structure and leaf shapes (P parameters).
    split: int scalar in [0, P], traceable (no recompilation per value).
    ratio: float scalar r in [0, 1], traceable.

  Returns:
    The child, a tree like `a` (each leaf in a's dtype).
  """
  leaves_a, treedef = jax.tree.flatten(a)
  leaves_b = treedef.flatten_up_to(b)
  split = jnp.asarray(split)
  ratio = jnp.asarray(ratio, jnp.float32)
  out = []
  offset = 0
  for la, lb in zip(leaves_a, leaves_b):
    la, lb = jnp.asarray(la), jnp.asarray(lb)
    index = offset + jnp.arange(la.size).reshape(la.shape)
    w = jnp.where(index < split, ratio, 1.0 - ratio)
    out.append((w * la + (1.0 - w) * lb).astype(la.dtype))
    offset += la.size
  return jax.tree.unflatten(treedef, out)


def _check_scores(scores: jax.Array) -> None:
  if jnp.ndim(scores) != 2:
    raise ValueError(f"scores: need f32[models, examples], got shape {jnp.shape(scores)}")


def shared_fitness(
    scores: jax.typing.ArrayLike,
    *,
    alpha: float = 1.0,
    capacity: jax.typing.ArrayLike = 1.0,
    eps: float = 1e-8,
) -> jax.Array:
  """Fitness under resource competition (see the module).

  Args:
    scores: f32[M, N], s_ij >= 0: model i's score on example j.
    alpha: competition strength (0: none, 1: classic fitness sharing).
    capacity: c_j, a scalar or f32[N].
    eps: keeps an example that no model solves from dividing by zero.

  Returns:
    f32[M]: f_i = sum_j c_j s_ij / (sum_k s_kj + eps) ** alpha.
  """
  scores = jnp.asarray(scores, jnp.float32)
  _check_scores(scores)
  total = scores.sum(axis=0)
  return (jnp.asarray(capacity) * scores / (total + eps) ** alpha).sum(axis=1)


def attraction(
    scores: jax.typing.ArrayLike,
    first: jax.typing.ArrayLike,
    *,
    capacity: jax.typing.ArrayLike = 1.0,
    eps: float = 1e-8,
) -> jax.Array:
  """How much each model complements model `first` (see the module).

  Args:
    scores: f32[M, N], s_ij >= 0.
    first: int scalar, the first parent's row (traceable).
    capacity: c_j, a scalar or f32[N].
    eps: as in `shared_fitness`.

  Returns:
    f32[M]: g_k = sum_j c_j / (sum_i s_ij + eps) * max(s_kj - s_first,j, 0);
    g_first = 0.
  """
  scores = jnp.asarray(scores, jnp.float32)
  _check_scores(scores)
  scarcity = jnp.asarray(capacity) / (scores.sum(axis=0) + eps)
  gain = jnp.maximum(scores - scores[first], 0.0)
  return (scarcity * gain).sum(axis=1)


def _scores(apply_fn, score_fn, data, variables) -> jax.Array:
  """f32[N]: score_fn(variables), or correctness of apply_fn's argmax on data = (x, y)."""
  if score_fn is not None:
    return score_fn(variables)
  x, y = data
  return (jnp.argmax(apply_fn(variables, x), axis=-1) == y).astype(jnp.float32)


def _survivors(scores: jax.Array, alpha: float, keep: int) -> jax.Array:
  """int32[keep]: the best mean score first, then the highest shared fitness."""
  elite = jnp.argmax(scores.mean(axis=1))
  fitness = shared_fitness(scores, alpha=alpha).at[elite].set(jnp.inf)
  return jnp.argsort(-fitness, stable=True)[:keep]


def _check_evolve_args(population, data, generations, archive_size, alpha, mate):
  models = check_models(population)
  if len(models) < 2:
    raise ValueError(f"population: need at least 2 models, got {len(models)}")
  if not isinstance(generations, (int, np.integer)) or generations < 0:
    raise ValueError(f"generations must be an int >= 0, got {generations!r}")
  archive_size = len(models) if archive_size is None else archive_size
  if not isinstance(archive_size, (int, np.integer)) or not 2 <= archive_size <= len(models):
    raise ValueError(
        f"archive_size must be an int in [2, {len(models)}] (the population's size), "
        f"got {archive_size!r}")
  if not 0 <= alpha < math.inf:
    raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
  if mate not in MATE_CHOICES:
    raise ValueError(f"mate must be one of {MATE_CHOICES}, got {mate!r}")
  if not callable(data):
    if not isinstance(data, (tuple, list)) or len(data) != 2:
      raise ValueError("data: need (x, y) or a callable score_fn(variables) -> f32[N]")
    x, y = data
    if np.ndim(y) != 1 or not np.issubdtype(np.asarray(y).dtype, np.integer):
      raise ValueError(f"data: y must be int[N], got {np.asarray(y).dtype}{np.shape(y)}")
    if np.shape(x)[:1] != np.shape(y):
      raise ValueError(f"data: x has {np.shape(x)[:1]} examples but y has {np.shape(y)}")
  if num_parameters(models[0]) >= np.iinfo(np.int32).max:
    raise ValueError(f"population: {num_parameters(models[0])} parameters per model; split points "
                     "are int32, so at most 2**31 - 2")
  return models, int(generations), int(archive_size)


_STATIC = ("apply_fn", "score_fn", "alpha")


@functools.partial(jax.jit, static_argnames=_STATIC + ("archive_size",))
def _initial(stacked, data, *, apply_fn, score_fn, alpha, archive_size):
  """The first archive (stacked, [A, ...]) and its scores f32[A, N] from the population."""
  scores = jax.vmap(lambda v: _scores(apply_fn, score_fn, data, v))(stacked)
  keep = _survivors(scores, alpha, archive_size)
  return jax.tree.map(lambda leaf: leaf[keep], stacked), scores[keep]


@functools.partial(jax.jit, static_argnames=_STATIC + ("mate", "num_params"))
def _generation(archive, scores, data, key, *, apply_fn, score_fn, alpha, mate, num_params):
  """One child from two parents, then the archive of the A survivors of A + 1."""
  archive_size = scores.shape[0]
  k_first, k_second, k_split, k_ratio = jax.random.split(key, 4)
  fitness = shared_fitness(scores, alpha=alpha)
  first = jax.random.categorical(k_first, jnp.log(fitness + 1e-12))
  if mate == "attraction":
    weight = attraction(scores, first) + 1e-12
  else:
    weight = jnp.ones(archive_size)
  second = jax.random.categorical(k_second, jnp.log(weight.at[first].set(0.0)))
  split = jax.random.randint(k_split, (), 0, num_params + 1)
  ratio = jax.random.uniform(k_ratio)
  parent_a = jax.tree.map(lambda leaf: leaf[first], archive)
  parent_b = jax.tree.map(lambda leaf: leaf[second], archive)
  child = split_merge(parent_a, parent_b, split, ratio)
  child_scores = _scores(apply_fn, score_fn, data, child)
  candidates = jnp.concatenate([scores, child_scores[None]])
  keep = jnp.sort(_survivors(candidates, alpha, archive_size))
  dropped = jnp.setdiff1d(jnp.arange(archive_size + 1), keep, size=1)[0]
  pool = jax.tree.map(lambda leaf, c: jnp.concatenate([leaf, c[None]]), archive, child)
  scores = candidates[keep]
  record = (scores.mean(axis=1).max(), child_scores.mean(), jnp.stack([first, second]),
            split, ratio, dropped)
  return jax.tree.map(lambda leaf: leaf[keep], pool), scores, record


def evolve(
    apply_fn: Callable[..., jax.Array] | None,
    population: Sequence[PyTree],
    data: tuple[jax.Array, jax.Array] | ScoreFn,
    *,
    generations: int,
    key: jax.Array,
    archive_size: int | None = None,
    alpha: float = 1.0,
    mate: str = "attraction",
) -> tuple[PyTree, EvolutionHistory]:
  """M2N2: evolve a merged model from a population (see the module).

  Args:
    apply_fn: apply_fn(variables, x) -> logits f32[N, classes]; used only
      when `data` is (x, y).
    population: M >= 2 models of one structure and leaf shapes.
    data: validation data (x f32[N, ...], y int[N]), scored by correctness,
      or score_fn(variables) -> f32[N], per-example scores >= 0 (jittable,
      hashable: a jit static argument, like apply_fn).
    generations: G >= 0 children.
    key: a jax PRNG key; the same key gives the same result.
    archive_size: A in [2, M] (default M); a smaller archive starts from the
      population's best mean score plus the highest shared fitness.
    alpha: resource competition's strength (`shared_fitness`).
    mate: "attraction" (the paper) or "random" (the second parent uniform
      among the others; an ablation).

  Returns:
    (the archive's model of best mean score, EvolutionHistory).

  Raises:
    ValueError: fewer than 2 models or models that differ (naming the leaf),
      a bad generations / archive_size / alpha / mate, or data that is
      neither (x, y) with int labels of matching length nor a callable, or
      models of 2**31 - 1 parameters or more; all before any model is run.
  """
  models, generations, archive_size = _check_evolve_args(
      population, data, generations, archive_size, alpha, mate)
  score_fn = data if callable(data) else None
  data = () if callable(data) else (jnp.asarray(data[0]), jnp.asarray(data[1]))
  scoring = dict(apply_fn=None if score_fn else apply_fn, score_fn=score_fn)
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *models)
  archive, scores = _initial(stacked, data, alpha=alpha, archive_size=archive_size, **scoring)
  best = [float(scores.mean(axis=1).max())]
  records = []
  num_params = num_parameters(models[0])
  for k in jax.random.split(key, generations):
    archive, scores, record = _generation(archive, scores, data, k, alpha=alpha, mate=mate,
                                          num_params=num_params, **scoring)
    records.append(record)
  records = jax.device_get(records)
  best += [float(r[0]) for r in records]
  mean_scores = np.asarray(scores.mean(axis=1))
  history = EvolutionHistory(
      best_score=np.asarray(best, np.float32),
      child_score=np.asarray([r[1] for r in records], np.float32),
      parents=np.asarray([r[2] for r in records], np.int32).reshape(generations, 2),
      split=np.asarray([r[3] for r in records], np.int32),
      ratio=np.asarray([r[4] for r in records], np.float32),
      dropped=np.asarray([r[5] for r in records], np.int32),
      archive_scores=mean_scores.astype(np.float32),
  )
  winner = int(np.argmax(mean_scores))
  return jax.tree.map(lambda leaf: leaf[winner], archive), history
