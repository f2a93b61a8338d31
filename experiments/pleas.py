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


def merge_pair(config, model, members, va, vb, budget: float, method: str):
  """(merged variables, layout, Report) of one method at one budget."""
  name, kwargs = config.model.name, dict(config.model.config)
  x = np.concatenate([m.task.x_train for m in members])
  spec = mj.models.permutation_spec(name, va, **kwargs)
  build_fn = lambda layout: functools.partial(
      mj.models.build(name, layout, **kwargs).apply, train=True, mutable=["batch_stats"])
  options = dict(
      budget=budget, spec=spec, ridge=config.pleas.ridge, report=True, progress=False,
      build_fn=build_fn if "batch_stats" in va else None)
  apply_fn = functools.partial(model.apply, train=False)
  if method == "permute and average":
    return mj.merge.pleas(apply_fn, va, vb, _batches(x, config.pleas.batch_size), least_squares_fit=False,
                          **options)
  if method == "ZipIt!":
    merged, layout, alloc = mj.merge.zipit(apply_fn, va, vb, _batches(x, config.pleas.batch_size),
                                           budget=budget, spec=spec, build_fn=options["build_fn"],
                                           progress=False)
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
    score = lambda fn: {column.get(k, k): v for k, v in evaluate.score_model(fn, tasks).items()}
    fa, fb = evaluate.jit_logits(model.apply, va), evaluate.jit_logits(model.apply, vb)
    for method, fn in (("model A", fa), ("model B", fb),
                       ("ensemble", lambda x: evaluate.ensemble_logits([fa(x), fb(x)]))):
      results.append({"seed": seed, "budget": None, "method": method, **score(fn)})
    for budget in config.pleas.budgets:
      for method in config.pleas.methods:
        t0 = time.perf_counter()
        merged, layout, report = merge_pair(config, model, members, va, vb, budget, method)
        merged_model = mj.models.build(config.model.name, layout, **dict(config.model.config))
        row = {"seed": seed, "budget": budget, "method": method, "flops": report.allocation.cost,
               "params": _nonzero(merged) / mj.tree.num_params(va),
               "seconds": time.perf_counter() - t0,
               **score(evaluate.jit_logits(merged_model.apply, merged))}
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
    scores = {k: v for k, v in r.items() if k.startswith("task") or k in ("joint", "flops", "params")}
    for k, v in scores.items():
      out.setdefault(r["method"], {}).setdefault(str(r["budget"]), {}).setdefault(k, []).append(v)
  return {m: {b: {k: (float(np.mean(v)), float(np.std(v))) for k, v in s.items()} for b, s in bs.items()}
          for m, bs in out.items()}


def format_summary(summary) -> str:
  lines = []
  for method, budgets in summary.items():
    for budget, scores in budgets.items():
      cells = "  ".join(f"{k} {100 * m:5.1f}±{100 * s:4.1f}" for k, (m, s) in scores.items()
                        if k.startswith("task") or k == "joint")
      lines.append(f"{method:22s} budget {budget:>4s}  {cells}")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.main(run, about="PLeaS", config="experiments/configs/pleas_mlp_digits.py", workdir="workdir/pleas")
