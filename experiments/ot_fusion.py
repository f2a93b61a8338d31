r"""OT fusion (mergejax.merge.ot_fusion) against each model and the averages, on pairs of MLPs.

    python -m experiments.ot_fusion \
        --config=experiments/configs/ot_fusion_mlp_digits.py --workdir=/tmp/ot_fusion

A fraction `config.ot_fusion.validation_fraction` of the training set is held
out as a validation slice (`experiments.task_vectors.hold_out`); the models
train on the rest. For each seed in `config.ot_fusion.seeds`, trains (or
reuses) three models: A and B of `config.model` from two seeds, and W, as A
but `wide_features` wide, from a third. It then merges B into A (same width)
and W into A (a wider model into a narrower one, the fused model at A's
width) and scores test accuracy: each model; the plain average and weight
matching then average (same width only: they need equal shapes); OT fusion
(exact, weight cost; exact, activation cost; activation cost at the epsilon
of `epsilons`, 0 being exact OT, whose fusion scores best on the validation
slice, chosen per seed and pair); and B (or W) alone carried onto A's units
by the exact activation plan (t = 1: what the transport keeps of it). Prints
the table (mean and standard deviation over seeds) and the chosen epsilons,
writes `<workdir>/ot_fusion.json` ({"accuracy": {pair: {row: [per seed]}},
"chosen_epsilon": {pair: [per seed]}}).
"""

import functools
import json
import pathlib
import time

import jax
import ml_collections
import numpy as np

from experiments import cli
from experiments import evaluate
from experiments import task_vectors
from experiments import train
import mergejax as mj

PAIRS = ("same width", "wider into narrower")
CHOSEN = "OT (activation, epsilon on validation)"


def _accuracy(apply_fn, variables, task) -> float:
  """Test accuracy (of `task.x_test`: the validation slice for the validation task); `apply_fn` jitted once
  per model (not once per variables)."""
  logits = evaluate.logits_in_chunks(lambda x: apply_fn(variables, x), task.x_test)
  return evaluate.task_accuracy(logits, task.y_test, None)


def _trained(config, features, name: str, seed: int, task, workdir: pathlib.Path):
  """(module, variables, its jitted apply) of an MLP `features` wide trained with `seed`."""
  member_config = ml_collections.ConfigDict(config.to_dict())
  member_config.model.config.features = tuple(features)
  model = mj.models.build(config.model.name, **{**train.model_config(member_config), "num_classes": 10})
  variables, _ = train.train_member(member_config, model, train.Member(name, task, seed), workdir)
  return model, variables, jax.jit(model.apply)


def fuse_rows(config, task, validation, a, b, same_width: bool) -> tuple[dict[str, float], float]:
  """(Test accuracy of each merge of model b into model a, the epsilon chosen on `validation`).

  a, b: (module, variables, jitted apply) each. The epsilon of `config.ot_fusion.epsilons` whose
  activation-cost fusion scores best on the validation slice (the first of equals) gives the CHOSEN row.
  """
  (model_a, va, apply_a), (model_b, vb, apply_b) = a, b
  x = task.x_train[: config.ot_fusion.batch_size]
  rows = {"model A": _accuracy(apply_a, va, task), "model B (or W)": _accuracy(apply_b, vb, task)}
  if same_width:
    rows["average"] = _accuracy(apply_a, mj.merge.average([va, vb]), task)
    spec = mj.permutation_spec(model_a.apply, va, x)
    perm = mj.weight_matching(spec, va, vb, key=jax.random.key(0)).perm
    rows["weight matching + average"] = _accuracy(apply_a, mj.merge.average(
        [va, mj.apply_permutation(spec, perm, vb)]), task)
  fuse = functools.partial(mj.merge.ot_fusion, model_a.apply, va, vb, x, apply_fn_b=model_b.apply)
  rows["OT (weight, exact)"] = _accuracy(apply_a, fuse(cost="weight")[0], task)
  # One exact activation plan gives two rows: B averaged with A, and B alone (t = 1) at A's width.
  carried, _ = mj.merge.ot_align(model_a.apply, va, vb, x, cost="activation", apply_fn_b=model_b.apply)
  rows["OT (activation, exact)"] = _accuracy(apply_a, mj.merge.average([va, carried]), task)
  fused = {float(e): fuse(cost="activation", epsilon=float(e))[0] for e in config.ot_fusion.epsilons}
  validation_accuracy = {e: _accuracy(apply_a, v, validation) for e, v in fused.items()}
  chosen = max(validation_accuracy, key=validation_accuracy.get)
  rows[CHOSEN] = _accuracy(apply_a, fused[chosen], task)
  rows["B (or W) alone, OT to A's width"] = _accuracy(apply_a, carried, task)
  return rows, chosen


def run(config, workdir: str | pathlib.Path) -> dict:
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  epsilons = tuple(config.ot_fusion.epsilons)
  if not epsilons or not all(0 <= e < float("inf") for e in epsilons):
    raise ValueError(f"ot_fusion.epsilons = {epsilons}: needs one or more finite values >= 0 (0: exact OT)")
  dataset = mj.data.load(config.dataset, seed=config.data_seed)
  whole = mj.data.split(dataset, "replicas", seed=config.data_seed, count=1)[0]
  task, validation = task_vectors.hold_out(whole, config.ot_fusion.validation_fraction, config.data_seed)
  narrow, wide = tuple(config.model.config.features), tuple(config.ot_fusion.wide_features)
  results = {pair: {} for pair in PAIRS}
  chosen = {pair: [] for pair in PAIRS}
  for seed in config.ot_fusion.seeds:
    out = workdir / f"seed{seed}"
    a = _trained(config, narrow, "a", 3 * seed, task, out)
    b = _trained(config, narrow, "b", 3 * seed + 1, task, out)
    w = _trained(config, wide, "wide", 3 * seed + 2, task, out)
    for pair, other in zip(PAIRS, (b, w)):
      rows, epsilon = fuse_rows(config, task, validation, a, other, pair == "same width")
      chosen[pair].append(epsilon)
      for label, acc in rows.items():
        results[pair].setdefault(label, []).append(acc)
  labels = list(results["same width"])
  print(f"\nOT fusion of {config.model.name} {narrow} on {config.dataset}: test accuracy (%), mean ± std over"
        f" {len(config.ot_fusion.seeds)} seeds; W is {wide} wide")
  print(f"{'method':40s} " + " ".join(f"{p:>22s}" for p in PAIRS))
  for label in labels:
    cells = []
    for pair in PAIRS:
      accs = results[pair].get(label)
      cells.append(f"{100 * np.mean(accs):13.1f} ± {100 * np.std(accs):4.1f}" if accs else f"{'—':>22s}")
    print(f"{label:40s} " + " ".join(f"{c:>22s}" for c in cells))
  print(f"epsilon chosen on validation from {tuple(config.ot_fusion.epsilons)}, per seed: "
        + "; ".join(f"{pair} {chosen[pair]}" for pair in PAIRS))
  saved = {"accuracy": results, "chosen_epsilon": chosen}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "ot_fusion.json").write_text(json.dumps(saved, indent=1))
  print(f"\nwrote {workdir / 'ot_fusion.json'} ({time.perf_counter() - start:.0f} s)")
  return saved


if __name__ == "__main__":
  cli.main(run, about="OT fusion")
