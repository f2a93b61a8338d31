r"""Git Re-Basin: loss and accuracy along the path between two models, aligned or not.

    python -m experiments.rebasin \
        --config=experiments/configs/rebasin_mlp_mnist1d.py --workdir=/tmp/rebasin_mlp

Trains (or reuses) two models that differ only in their seed, then aligns B to
A by no permutation (naive), weight matching, activation matching and the
straight-through estimator, and evaluates test loss and accuracy at points of
`(1 - t) A + t B`, without and with repair (batch-norm reset for models with
BatchNorm, REPAIR otherwise). Prints a table of barriers (train and test loss,
test error), writes
`<workdir>/rebasin.json` and `<workdir>/rebasin.png`.
"""

import json
import pathlib
import time

from absl import logging
import jax
import numpy as np
import optax

from experiments import evaluate
from experiments import cli
from experiments import plots
from experiments import train
import mergejax as mj


def _match_batches(task, config):
  return cli.process_shard(lambda: mj.data.batches(
      task.x_train, batch_size=config.rebasin.batch_size, seed=config.seed, epochs=1))


def align(config, model, task, va, vb) -> dict[str, mj.MatchResult | None]:
  """B's permutation onto A by each method (None: the naive identity)."""
  x = task.x_train[: config.rebasin.batch_size]
  spec = mj.permutation_spec(model.apply, va, x)
  key = jax.random.key(config.seed)
  batches = _match_batches(task, config)

  def loss_fn(variables, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(variables, x), y).mean()

  labelled = cli.process_shard(mj.data.batches(task.x_train, task.y_train, batch_size=config.rebasin.batch_size,
                                               seed=config.seed, epochs=None))
  methods = {"naive": None}
  for name in config.rebasin.methods:
    start = time.perf_counter()
    if name == "weight":
      methods[name] = mj.weight_matching(spec, va, vb, key=key)
    elif name == "activation":
      methods[name] = mj.activation_matching(spec, model.apply, va, vb, batches, progress=False)
    elif name == "ste":
      methods[name] = mj.ste_matching(spec, loss_fn, va, vb, labelled, num_steps=config.rebasin.ste_steps, key=key)
    else:
      raise ValueError(f"unknown alignment method {name!r}")
    logging.info("%s matching: %.1f s", name, time.perf_counter() - start)
  return spec, methods


def path_metrics(config, model, task, va, vb, spec, repair: bool) -> mj.lmc.Curve:
  """Train and test loss and accuracy along the path from va to vb."""
  batches = _match_batches(task, config)
  splits = {"train": (task.x_train, task.y_train), "test": (task.x_test, task.y_test)}

  def eval_fn(variables):
    logits_fn = evaluate.jit_logits(model.apply, variables)
    out = {}
    for split, (x, y) in splits.items():
      logits = evaluate.logits_in_chunks(logits_fn, x)
      out[f"{split} loss"] = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
      out[f"{split} accuracy"] = evaluate.task_accuracy(logits, y, None)
    return out

  transform = None
  if repair and "batch_stats" in va:
    def transform(variables, t):
      del t
      train_apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
      return mj.repair.reset_batch_norm(train_apply, variables, batches())
  elif repair:
    def transform(variables, t):
      if t in (0.0, 1.0):
        return variables
      return mj.repair.repair(spec, model.apply, va, vb, variables, batches, t=t)
  return mj.lmc.interpolate(eval_fn, va, vb, num=config.rebasin.num_points, transform=transform)


def run(config, workdir: str | pathlib.Path) -> dict:
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  members, model, (va, vb), _ = train.train_pair(config, workdir)
  task = members[0].task
  spec, methods = align(config, model, task, va, vb)
  results, lines = {}, {}
  for name, match in methods.items():
    aligned = vb if match is None else mj.apply_permutation(spec, match.perm, vb)
    for repair in (False, True):
      label = name + (" + repair" if repair else "")
      curve = path_metrics(config, model, task, va, aligned, spec, repair)
      mid = len(curve.t) // 2
      results[label] = {
          "train_loss_barrier": mj.lmc.barrier(curve, "train loss"),
          "test_loss_barrier": mj.lmc.barrier(curve, "test loss"),
          "test_error_barrier": mj.lmc.barrier(
              mj.lmc.Curve(curve.t, {"error": 1 - curve.values["test accuracy"]})),
          "midpoint_test_accuracy": float(curve.values["test accuracy"][mid]),
          "t": curve.t.tolist(),
          **{k: v.tolist() for k, v in curve.values.items()},
      }
      lines[label] = curve.values["train loss"]
  print(f"\n{config.model.name} on {config.dataset}, two seeds ({members[0].seed}, {members[1].seed})")
  print(f"{'method':22s} {'train loss barrier':>19s} {'test loss barrier':>18s} {'test error barrier':>19s}"
        f" {'test acc, t=0.5':>16s}")
  for label, r in results.items():
    print(f"{label:22s} {r['train_loss_barrier']:19.4f} {r['test_loss_barrier']:18.4f}"
          f" {100 * r['test_error_barrier']:18.1f}% {100 * r['midpoint_test_accuracy']:15.1f}%")
  naive, weight = results["naive"]["train_loss_barrier"], results.get("weight", {}).get("train_loss_barrier")
  if weight is not None and naive > 0:
    print(f"weight matching removes {100 * (1 - weight / naive):.0f}% of the naive train loss barrier")
  plot = plots.curves(np.asarray(results["naive"]["t"]), lines, workdir / "rebasin.png",
                      f"{config.model.name} on {config.dataset}: train loss along the path", "train loss")
  (workdir / "rebasin.json").write_text(json.dumps(results, indent=1))
  print(f"\nwrote {plot} and {workdir / 'rebasin.json'} ({time.perf_counter() - start:.0f} s)")
  return results


if __name__ == "__main__":
  cli.main(run, about="Re-basin")
