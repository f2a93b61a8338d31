r"""`make demo`: train a pair of models on disjoint label halves and compare.

    python -m experiments.demo --workdir=workdir/demo

Trains (or reuses, from the work directory) two MLPs on digits, model A on
classes 0-4 and model B on 5-9, then prints per-task and joint accuracy of A,
B, their ensemble (mean of probabilities), the naive average of their weights,
their average after weight matching (B's units permuted onto A's, Git
Re-Basin), and their PLeaS merges (partial matching and least squares) at
budgets 1.0 (one model's FLOPs) and 1.5, and writes `<workdir>/demo.png` and `<workdir>/results.json`.
"""

import json
import pathlib
import time

import numpy as np

from experiments import evaluate
from experiments import cli
from experiments import plots
from experiments import train
import mergejax as mj

def compare(model, members, va, vb, model_name: str, model_config: dict) -> dict[str, dict[str, float]]:
  """Scores of A, B, their ensemble, their weight average, the average after
  weight matching (B permuted onto A, Git Re-Basin), and PLeaS on every task.

  Columns are named after the member trained on the task (`task a`), and
  `joint`.
  """
  tasks = [m.task for m in members]
  column = {m.task.name: f"task {m.name}" for m in members}
  fa = evaluate.jit_logits(model.apply, va)
  fb = evaluate.jit_logits(model.apply, vb)
  spec = mj.permutation_spec(model.apply, va, tasks[0].x_train[:1])
  aligned = mj.apply_permutation(spec, mj.weight_matching(spec, va, vb).perm, vb)
  logits_fns = {
      "model A": fa,
      "model B": fb,
      "ensemble": lambda x: evaluate.ensemble_logits([fa(x), fb(x)]),
      "average": evaluate.jit_logits(model.apply, mj.tree.lerp(va, vb, 0.5)),
      "aligned average": evaluate.jit_logits(model.apply, mj.tree.lerp(va, aligned, 0.5)),
  }
  x = np.concatenate([t.x_train for t in tasks])
  batches = lambda: [x[i:i + 256] for i in range(0, len(x), 256)]
  hand_spec = mj.models.permutation_spec(model_name, va, **model_config)
  for budget in (1.0, 1.5):
    merged, layout = mj.merge.pleas(model.apply, va, vb, batches, budget=budget, spec=hand_spec,
                                    matching="activation", progress=False)
    merged_model = mj.models.build(model_name, layout, **model_config)
    logits_fns[f"PLeaS, budget {budget}"] = evaluate.jit_logits(merged_model.apply, merged)
  return {
      name: {column.get(k, k): v for k, v in evaluate.score_model(fn, tasks).items()}
      for name, fn in logits_fns.items()
  }


def run(config, workdir: str | pathlib.Path) -> dict[str, dict[str, float]]:
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  members, model, (va, vb), _ = train.train_pair(config, workdir)
  rows = compare(model, members, va, vb, config.model.name, dict(config.model.config))
  print(f"\n{config.model.name} on {config.dataset}, split {config.split.kind}"
        f" ({', '.join(f'{m.name}: {m.task.name}' for m in members)})")
  print(evaluate.format_table(rows))
  plot = plots.bar_chart(rows, workdir / "demo.png", f"{config.model.name} on {config.dataset}: per-task accuracy")
  (workdir / "results.json").write_text(json.dumps(rows, indent=1))
  print(f"\nwrote {plot} and {workdir / 'results.json'} ({time.perf_counter() - start:.0f} s)")
  return rows


if __name__ == "__main__":
  cli.main(run, about="Pair", config="experiments/configs/digits_mlp_pair.py", workdir="workdir/demo")
