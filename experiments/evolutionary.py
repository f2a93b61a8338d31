r"""Evolutionary merging (M2N2, `mj.merge.evolve`) of specialists against simple baselines.

    python -m experiments.evolutionary \
        --config=experiments/configs/evolutionary_digits.py --workdir=/tmp/evolutionary

Per seed: `num_models` MLPs from one initialisation, model i trained on
`classes_per_model` of the classes (starting at class C i // num_models,
cyclically), so each is a specialist; a joint model from the same
initialisation trained on every class for the same steps (the reference).
The specialists are then merged by:

- the best single model (chosen on the validation slice),
- a uniform average,
- M2N2 (`mj.merge.evolve`) for `generations` children, fitness on the
  validation slice held out of training, once per mate choice in
  `config.mates` ("attraction": the paper's; "random": the ablation).

Prints the test accuracy table (mean and standard deviation over seeds),
writes `<workdir>/evolutionary.json` and `<workdir>/evolutionary.png` (the
archive's best validation accuracy over generations, per seed).
"""

import json
import time

import jax
import numpy as np
import optax

from experiments import cli
from experiments import evaluate
from experiments import plots
import mergejax as mj


def label_subsets(num_classes: int, num_models: int, classes_per_model: int) -> list[list[int]]:
  """Model i's classes: classes_per_model consecutive ones from C i // num_models, cyclically."""
  return [[(num_classes * i // num_models + k) % num_classes for k in range(classes_per_model)]
          for i in range(num_models)]


def _trainer(config, model):
  """train(variables, x, y, seed) -> variables: Adam on cross-entropy, one compilation."""
  optimizer = optax.adam(config.learning_rate)

  @jax.jit
  def step(v, opt_state, xb, yb):
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb).mean())(v)
    updates, opt_state = optimizer.update(grads, opt_state, v)
    return optax.apply_updates(v, updates), opt_state

  def train(variables, x, y, seed):
    opt_state = optimizer.init(variables)
    batches = mj.data.batches(x, y, batch_size=config.batch_size, seed=seed, epochs=None,
                              drop_remainder=True)
    for _, (xb, yb) in zip(range(config.num_steps), batches):
      variables, opt_state = step(variables, opt_state, xb, yb)
    return variables

  return train


def run_seed(config, ds, train_xy, val_xy, seed: int) -> dict:
  """Each method's validation and test accuracy, and evolution's history, for one seed."""
  model = mj.models.build("mlp", features=tuple(config.features), num_classes=ds.num_classes)
  apply = jax.jit(model.apply)
  both_x, n_val = np.concatenate([val_xy[0], ds.x_test]), len(val_xy[0])

  def scores(variables):
    """Validation and test accuracy from one forward pass (one compilation)."""
    right = np.argmax(np.asarray(apply(variables, both_x)), -1) == np.concatenate([val_xy[1], ds.y_test])
    return {"val": float(right[:n_val].mean()), "test": float(right[n_val:].mean())}

  init = jax.jit(model.init)(jax.random.key(seed), train_xy[0][:2])
  train = _trainer(config, model)
  x, y = train_xy
  subsets = label_subsets(ds.num_classes, config.num_models, config.classes_per_model)
  models = [train(init, x[np.isin(y, s)], y[np.isin(y, s)], 100 * seed + i)
            for i, s in enumerate(subsets)]
  members = [scores(m) for m in models]
  best = max(range(len(models)), key=lambda i: members[i]["val"])  # first of a tie
  rows = {"best single model": members[best], "uniform average": scores(mj.merge.average(models))}
  histories = {}
  for mate in config.mates:
    evolved, history = mj.merge.evolve(
        model.apply, models, val_xy, generations=config.generations, key=jax.random.key(seed),
        archive_size=config.archive_size, alpha=config.alpha, mate=mate)
    rows[f"M2N2 ({mate} mates)"] = scores(evolved)
    histories[mate] = history.best_score.tolist()
  rows["joint (all classes)"] = scores(train(init, x, y, 100 * seed + len(models)))
  return {"rows": rows, "members": members, "subsets": subsets, "best_val": histories}


def run(config, workdir):
  workdir, _, per_seed, start = evaluate.run_seeds(config, workdir, run_seed)
  seeds = list(per_seed.values())
  summary = {name: evaluate.mean_std([s["rows"][name]["test"] for s in seeds]) for name in seeds[0]["rows"]}
  print(f"\nM2N2 on {config.dataset}: {config.num_models} MLPs {tuple(config.features)} on"
        f" {config.classes_per_model} classes each, {config.generations} generations;"
        f" test accuracy (%), mean ± std over seeds {tuple(config.seeds)}")
  for name, stat in summary.items():
    print(f"{name:28s}{100 * stat['mean']:6.1f} ± {100 * stat['std']:.1f}")
  lines = {f"seed {seed}, {mate} mates": np.asarray(s["best_val"][mate])
           for seed, s in per_seed.items() for mate in config.mates}
  figure = plots.curves(np.arange(config.generations + 1), lines, workdir / "evolutionary.png",
                        "M2N2: the archive's best model", "validation accuracy", xlabel="generation")
  results = {"per_seed": per_seed, "summary": summary, "config": config.to_dict()}
  (workdir / "evolutionary.json").write_text(json.dumps(results, indent=1))
  print(f"\nwrote {workdir / 'evolutionary.json'} and {figure} ({time.perf_counter() - start:.0f} s)")
  return results


if __name__ == "__main__":
  cli.main(run, about="Evolutionary merging")
