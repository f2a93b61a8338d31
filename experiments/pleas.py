r"""PLeaS against permute-and-average across budgets, over seed pairs.

    python -m experiments.pleas \
        --config=experiments/configs/pleas_mlp_digits.py --workdir=/tmp/pleas_mlp

For every seed pair (model A and B trained on disjoint label halves from
different initialisations) and every budget, merges the pair by each method
and scores per-task accuracy:

- permute and average: partial weight matching, merged units averaged, the
  rest kept (the PLeaS paper's baseline), no least squares;
- PLeaS (weight) / PLeaS (activation): the same layout, every layer solved by
  least squares on the training inputs;
- ZipIt!: features zipped within and across models, the first groups
  zipped and the rest kept; its budgets are discrete, so the achieved budget
  (`flops` in the JSON) is at or below the one asked;
- PLeaS-free: activation matching and least squares on inputs of another
  domain (`config.pleas.free_transforms` of the images).

With `config.pleas.heads = "separate"`, each model's shared head is split
into one head per task (its classes' columns) and every merge keeps each
model's own task head (`heads=` of `pleas` and `zipit`), solved or zipped
from the merged and that model's kept features; "shared" merges the heads.
With `config.pleas.probe`, every model is also scored by a fresh linear probe
per task on the features its head reads (`probe task ...` columns), as the
PLeaS paper scores its fine-grained pairs; the ensemble's probe reads both
models' features side by side.

Prints mean and std over seed pairs, writes `<workdir>/pleas.json` and
`<workdir>/pleas.png` (accuracy against budget; FLOPs and parameter budgets
are both reported in the JSON, parameters as the non-zero ones).
"""

import functools
import json
import pathlib
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import evaluate
from experiments import cli
from experiments import plots
from experiments import train
import mergejax as mj


def _batches(x: np.ndarray, size: int):
  return lambda: [x[i:i + size] for i in range(0, len(x), size)]


def _free_inputs(config, x: np.ndarray) -> np.ndarray:
  for k, (name, options) in enumerate(config.pleas.free_transforms):
    x = mj.data.transforms.transform_fn(name, seed=config.seed + k, **dict(options))(x)
  return x


def _nonzero(variables) -> int:
  """Parameters that are not structural zeros (dense kernels store those as 0)."""
  return sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(variables["params"]))


def _head_features(apply_fn, variables):
  """x -> the input of the last kernel `apply_fn` uses (the head's features)."""
  captured = jax.jit(functools.partial(mj.capture(apply_fn), variables))
  return lambda x: list(captured(x)[1].values())[-1]


def _task_heads(variables, tasks):
  """A shared head over the global labels, split into one head per task (its classes' columns)."""
  params = dict(variables["params"])
  head = params.pop("head")
  for t, task in enumerate(tasks):
    params[f"head_{t}"] = {k: v[..., np.asarray(task.classes)] for k, v in head.items()}
  return {**variables, "params": params}


def _global_logits(apply_fn, tasks, num_classes: int):
  """x -> f32[n, num_classes] from a model with one head per task (each at its classes)."""

  def logits(variables, x):
    out = jnp.full((x.shape[0], num_classes), -1e9)
    for task, head in zip(tasks, apply_fn(variables, x)):
      out = out.at[:, np.asarray(task.classes)].set(head)
    return out

  return logits


def merge_pair(config, model, kwargs, members, va, vb, budget: float, method: str):
  """(merged variables, layout, Report) of one method at one budget."""
  name = config.model.name
  x = np.concatenate([m.task.x_train for m in members])
  spec = mj.models.permutation_spec(name, va, **kwargs)
  build_fn = lambda layout: functools.partial(
      mj.models.build(name, layout, **kwargs).apply, train=True, mutable=["batch_stats"])
  heads = {"a": ("params", "head_0"), "b": ("params", "head_1")} if config.pleas.heads == "separate" else None
  options = dict(
      budget=budget, spec=spec, heads=heads, ridge=config.pleas.ridge, report=True, progress=False,
      build_fn=build_fn if "batch_stats" in va else None)
  apply_fn = functools.partial(model.apply, train=False)
  if method == "permute and average":
    return mj.merge.pleas(apply_fn, va, vb, _batches(x, config.pleas.batch_size), least_squares_fit=False,
                          **options)
  if method == "ZipIt!":
    merged, layout, alloc = mj.merge.zipit(apply_fn, va, vb, _batches(x, config.pleas.batch_size),
                                           budget=budget, spec=spec, heads=heads,
                                           build_fn=options["build_fn"], progress=False)
    return merged, layout, mj.merge.Report(alloc, [], {})
  if method == "PLeaS-free":
    return mj.merge.pleas(apply_fn, va, vb, _batches(_free_inputs(config, x), config.pleas.batch_size),
                          matching="activation", **options)
  matching = {"PLeaS (weight)": "weight", "PLeaS (activation)": "activation"}[method]
  return mj.merge.pleas(apply_fn, va, vb, _batches(x, config.pleas.batch_size), matching=matching, **options)


def run(config, workdir):
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  results = []  # one row per (seed, budget, method)
  for seed in config.pleas.seeds:
    pair_config = config.copy_and_resolve_references()
    with pair_config.unlocked():
      pair_config.seed = seed
    members, model, (va, vb), _ = train.train_pair(pair_config, workdir / f"seed{seed}")
    tasks = [m.task for m in members]
    column = {m.task.name: f"task {m.name}" for m in members}
    kwargs = dict(config.model.config)
    logits_fn = lambda m: m.apply
    if config.pleas.heads == "separate":
      va, vb = _task_heads(va, tasks), _task_heads(vb, tasks)
      kwargs["num_classes"] = tuple(len(t.classes) for t in tasks)
      model = mj.models.build(config.model.name, **kwargs)
      logits_fn = lambda m: _global_logits(m.apply, tasks, tasks[0].num_classes)
    apply_eval = functools.partial(model.apply, train=False)

    def score(fn, features_fn):
      scores = {column.get(k, k): v for k, v in evaluate.score_model(fn, tasks).items()}
      if config.pleas.probe:
        scores.update({f"probe {column[k]}": v for k, v in evaluate.probe_accuracy(features_fn, tasks).items()})
      return scores

    fa, fb = evaluate.jit_logits(logits_fn(model), va), evaluate.jit_logits(logits_fn(model), vb)
    ha, hb = _head_features(apply_eval, va), _head_features(apply_eval, vb)
    for method, fn, features in (
        ("model A", fa, ha), ("model B", fb, hb),
        ("ensemble", lambda x: evaluate.ensemble_logits([fa(x), fb(x)]),
         lambda x: np.concatenate([np.asarray(ha(x)), np.asarray(hb(x))], -1))):
      results.append({"seed": seed, "budget": None, "method": method, **score(fn, features)})
    for budget in config.pleas.budgets:
      for method in config.pleas.methods:
        t0 = time.perf_counter()
        merged, layout, report = merge_pair(config, model, kwargs, members, va, vb, budget, method)
        merged_model = mj.models.build(config.model.name, layout, **kwargs)
        row = {"seed": seed, "budget": budget, "method": method, "flops": report.allocation.cost,
               "params": _nonzero(merged) / mj.tree.num_params(va),
               "seconds": time.perf_counter() - t0,
               **score(evaluate.jit_logits(logits_fn(merged_model), merged),
                       _head_features(functools.partial(merged_model.apply, train=False), merged))}
        results.append(row)
        logging.info("seed %d budget %.1f %s: %s", seed, budget, method, row)
  summary = summarise(results)
  print(format_summary(summary))
  (workdir / "pleas.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
  lines = {m: np.array([summary[m][str(b)]["joint"][0] for b in config.pleas.budgets])
           for m in config.pleas.methods}
  lines["ensemble"] = np.full(len(config.pleas.budgets), summary["ensemble"]["None"]["joint"][0])
  plot = plots.curves(np.array(config.pleas.budgets), lines, workdir / "pleas.png",
                     f"{config.model.name} on {config.dataset}: merging under a budget",
                     xlabel="budget (FLOPs relative to one model)", ylabel="joint accuracy")
  print(f"\nwrote {plot} and {workdir / 'pleas.json'} ({time.perf_counter() - start:.0f} s)")
  return summary


def summarise(results):
  """method -> budget -> score -> (mean, std) over seeds."""
  out = {}
  for r in results:
    scores = {k: v for k, v in r.items() if k.startswith(("task", "probe")) or k in ("joint", "flops", "params")}
    for k, v in scores.items():
      out.setdefault(r["method"], {}).setdefault(str(r["budget"]), {}).setdefault(k, []).append(v)
  return {m: {b: {k: (float(np.mean(v)), float(np.std(v))) for k, v in s.items()} for b, s in bs.items()}
          for m, bs in out.items()}


def format_summary(summary) -> str:
  lines = []
  for method, budgets in summary.items():
    for budget, scores in budgets.items():
      cells = "  ".join(f"{k} {100 * m:5.1f}±{100 * s:4.1f}" for k, (m, s) in scores.items()
                        if k.startswith(("task", "probe")) or k == "joint")
      lines.append(f"{method:22s} budget {budget:>4s}  {cells}")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.main(run, about="PLeaS", config="experiments/configs/pleas_mlp_digits.py", workdir="workdir/pleas")
