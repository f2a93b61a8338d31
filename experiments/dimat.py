r"""DIMAT (mergejax.merge.dimat) against agents trained alone, on non-iid shards of digits.

    python -m experiments.dimat \
        --config=experiments/configs/dimat_digits.py --workdir=/tmp/dimat

For each seed in `config.seeds`, `config.agents` MLPs (from their own
initialisations, or one shared with `same_init`) are trained alone for `pretrain_rounds` x
`steps_per_round` steps on their shards (agent
i: the classes of group i of 0..9, plus a slice shared by all), then run
`rounds` rounds of merge and `steps_per_round` local Adam steps, three ways:

  alone                     no merge (the identity mixing matrix)
  average, no alignment     the W-weighted average of the neighbours as they are
  DIMAT                     neighbours activation-matched to the agent first

Scores the mean over agents of test accuracy on all ten classes, after
pretraining (round 0) and after every round. Prints the table (mean and
standard deviation over seeds), writes `<workdir>/dimat.json` and the plot
`<workdir>/dimat_rounds.png` (accuracy over rounds).
"""

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli
from experiments import plots
import mergejax as mj

METHODS = ("alone", "average, no alignment", "DIMAT")


def shards(config, dataset) -> list[np.ndarray]:
  """Training indices per agent: its classes' examples plus a slice shared by every agent."""
  rng = np.random.default_rng(config.data_seed)
  n = len(dataset.y_train)
  shared = rng.choice(n, int(round(config.shared_fraction * n)), replace=False)
  groups = np.array_split(np.arange(dataset.num_classes), config.agents)
  return [np.union1d(np.flatnonzero(np.isin(dataset.y_train, g)), shared) for g in groups]


def make_train_fn(config, model, dataset, agent_shards):
  """`train_fn(variables, agent, round, key)`: `steps_per_round` Adam steps on the agent's shard.

  The batches are drawn on the host from `key`, so every agent and round runs one compilation.
  """
  optimizer = optax.adam(config.learning_rate)
  x, y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)

  @jax.jit
  def train(variables, picks, x, y):
    """picks: i32[steps, batch_size], rows of x and y."""

    def step(carry, idx):
      params, opt_state = carry
      grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
          model.apply({**variables, "params": p}, x[idx]), y[idx]).mean())(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    params = variables["params"]
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), picks)
    return {**variables, "params": params}

  def train_fn(variables, agent, round_, key):
    del round_
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    picks = rng.choice(agent_shards[agent], (config.steps_per_round, config.batch_size))
    return train(variables, jnp.asarray(picks, jnp.int32), x, y)

  return train_fn


def run(config, workdir: str | pathlib.Path) -> dict:
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  dataset = mj.data.load(config.dataset, seed=config.data_seed)
  model = mj.models.build("mlp", features=tuple(config.features), num_classes=dataset.num_classes)
  mixing = {"ring": mj.merge.ring_mixing, "complete": mj.merge.complete_mixing}[config.graph](config.agents)
  agent_shards = shards(config, dataset)
  align_rows = config.align_batches * config.align_batch_size
  batches = [np.split(dataset.x_train[s[np.random.default_rng(i).permutation(len(s))[:align_rows]]],
                      config.align_batches) for i, s in enumerate(agent_shards)]
  train_fn = make_train_fn(config, model, dataset, agent_shards)
  apply_fn = jax.jit(model.apply)
  init = jax.jit(model.init)
  x_test = jnp.asarray(dataset.x_test)

  def mean_accuracy(round_, agents):
    del round_
    return float(np.mean([np.mean(np.asarray(apply_fn(a, x_test).argmax(-1)) == dataset.y_test)
                          for a in agents]))

  no_groups = mj.PermutationSpec({}, {})
  settings = {"alone": (np.eye(config.agents), no_groups), "average, no alignment": (mixing, no_groups),
              "DIMAT": (mixing, None)}
  curves = {m: [] for m in METHODS}  # per method: per seed, accuracy after rounds 0..R
  for seed in config.seeds:
    key = jax.random.key(seed)
    agents = [init(jax.random.key(1000 * seed + (0 if config.same_init else i)), x_test[:1])
              for i in range(config.agents)]
    for r in range(config.pretrain_rounds):  # alone, in chunks of steps_per_round (one compilation)
      agents = [train_fn(a, i, r, jax.random.fold_in(jax.random.fold_in(key, 1000 + r), i))
                for i, a in enumerate(agents)]
    before = mean_accuracy(0, agents)
    for method in METHODS:
      w, spec = settings[method]
      _, history = mj.merge.dimat(model.apply, agents, w, batches, train_fn, rounds=config.rounds,
                                  key=jax.random.fold_in(key, 1 << 20), spec=spec, callback=mean_accuracy)
      curves[method].append([before, *history])
  results = {"rounds": config.rounds, "curves": curves}
  print(f"\nDIMAT: {config.agents} {tuple(config.features)} MLPs on a {config.graph}, {config.dataset} "
        f"non-iid shards; mean test accuracy (%) over agents on all classes, mean ± std over "
        f"{len(config.seeds)} seeds")
  print(f"{'method':24s} {'after pretraining':>18s} {f'after {config.rounds} rounds':>18s}")
  for method in METHODS:
    acc = 100 * np.asarray(curves[method])
    print(f"{method:24s} {acc[:, 0].mean():11.1f} ± {acc[:, 0].std():4.1f}"
          f" {acc[:, -1].mean():11.1f} ± {acc[:, -1].std():4.1f}")
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "dimat.json").write_text(json.dumps(results, indent=1))
  plots.curves(np.arange(config.rounds + 1), {m: 100 * np.mean(curves[m], axis=0) for m in METHODS},
               workdir / "dimat_rounds.png", f"DIMAT on {config.dataset}, {config.agents} agents ({config.graph})",
               "mean test accuracy (%)", xlabel="round (0: after pretraining alone)")
  print(f"\nwrote {workdir / 'dimat.json'}, {workdir / 'dimat_rounds.png'} ({time.perf_counter() - start:.0f} s)")
  return results


if __name__ == "__main__":
  cli.main(run, about="DIMAT")
