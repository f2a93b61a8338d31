r"""PLeaS against permute-and-average across budgets, over seed pairs.

    python -m experiments.pleas \
        --config=experiments/configs/pleas_mlp_digits.py --workdir=/tmp/pleas_mlp

For every seed pair (model A and B trained on disjoint label halves from
different initialisations) and every budget, merges the pair by each method
and scores per-task accuracy:

- average: no matching (B's units where they are), merged units averaged,
  the rest kept, no least squares: at budget 1.0 the plain average of the
  weights;
- permute and average: partial weight matching, merged units averaged, the
  rest kept (the PLeaS paper's baseline), no least squares;
- PLeaS (weight) / PLeaS (activation): the same layout, every layer solved by
  least squares on the training inputs;
- PLeaS (select): the matching PLeaS builds on (`config.pleas.candidates`:
  weight, activation, identity) chosen by `mj.merge.select_matching`: each
  candidate merged on the training inputs less a held-out split
  (`config.pleas.heldout` of each model's training data, never test data),
  the one whose merged model has the least cross-entropy on that split
  (language models: per-byte, the domains' mean) kept and merged again on
  all the training inputs (the chosen matching is in the row's `matching`);
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

Language models (`config.split.kind == "text_domains"`, the `stdlib_text`
corpus; `configs/pleas_lm_text.py`): model A is trained on the code domain
and B on the prose domain (`config.data_options` are `stdlib_text`'s
options), from different initialisations, and every model is scored by its
perplexity on each domain's test windows (`ppl code`, `ppl prose`; lower is
better) and `ppl mean`, the exponential of the two domains' mean per-byte
cross-entropy (their geometric mean). The ensemble averages the two models'
next-byte probabilities. The merges read `config.pleas.merge_windows` train
windows of each domain; PLeaS-free reads the same windows transformed by
`config.pleas.free_text` (`"reversed"`: each window's bytes backwards;
`"shuffled"`: the windows' bytes permuted among them; `"uniform"`: random
bytes), text neither model was trained on. There are no task heads and no
probes (the vocabulary is the output).

Prints mean and std over seed pairs, writes `<workdir>/pleas.json` and
`<workdir>/pleas.png` (accuracy or mean perplexity against budget; FLOPs and
parameter budgets are both reported in the JSON, parameters as the non-zero
ones).
"""

from collections.abc import Callable
import functools
import json
import pathlib
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import evaluate
from experiments import cli
from experiments import plots
from experiments import train
import mergejax as mj
from mergejax.merge import pleas_select


def _batches(x: np.ndarray, size: int):
  return cli.process_shard(lambda: [x[i:i + size] for i in range(0, len(x), size)])


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


class Heldout(NamedTuple):
  """What PLeaS (select) reads: its candidates merge on `fit_x`, and
  `loss(merged_model, merged_variables) -> float` scores each on the
  held-out rest of the training data (lower is better)."""

  fit_x: np.ndarray
  loss: Callable[[Any, Any], float]


def _heldout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit, held-out) indices of range(n): a seeded `fraction` (at least one, at most n - 1) held out."""
  order = np.random.default_rng(seed).permutation(n)
  k = min(max(1, round(fraction * n)), n - 1)
  return np.sort(order[k:]), np.sort(order[:k])


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean cross-entropy of f32[n, classes] logits against i32[n] labels."""
  return float(-np.mean(np.take_along_axis(jax.nn.log_softmax(jnp.asarray(logits), -1),
                                           jnp.asarray(labels)[:, None], -1)))


def merge_pair(config, model, kwargs, x: np.ndarray, free_x: np.ndarray, va, vb, budget: float, method: str,
               heldout: Heldout | None = None):
  """(merged variables, layout, Report, notes) of one method at one budget.

  Args:
    config: the experiment's config.
    model: the models' flax Module; kwargs: its zoo config.
    x: [n, ...], the inputs matching and least squares read (the tasks' own).
    free_x: [n, ...], the inputs PLeaS-free reads instead.
    va, vb: the two models' variables.
    budget: in [1, 2].
    method: one of `config.pleas.methods`.
    heldout: the split PLeaS (select) chooses its matching on.

  Returns:
    notes: for PLeaS (select), `{"matching": the chosen, "heldout loss":
    {candidate: its held-out loss}}`; otherwise empty.
  """
  name = config.model.name
  spec = mj.models.permutation_spec(name, va, **kwargs)
  build_fn = lambda layout: functools.partial(
      mj.models.build(name, layout, **kwargs).apply, train=True, mutable=["batch_stats"])
  heads = {"a": ("params", "head_0"), "b": ("params", "head_1")} if config.pleas.heads == "separate" else None
  options = dict(
      budget=budget, spec=spec, heads=heads, ridge=config.pleas.ridge, report=True, progress=False,
      build_fn=build_fn if "batch_stats" in va else None)
  apply_fn = functools.partial(model.apply, train=False)
  batches = _batches(x, config.pleas.batch_size)
  if method == "PLeaS (select)":
    if heldout is None:
      raise ValueError("merge_pair: PLeaS (select) needs the held-out split (heldout=)")
    score = lambda merged, layout: heldout.loss(mj.models.build(name, layout, **kwargs), merged)
    options.pop("report")
    choice = mj.merge.select_matching(apply_fn, va, vb, _batches(heldout.fit_x, config.pleas.batch_size), score,
                                      candidates=config.pleas.candidates, refit_batches=batches, **options)
    return choice.merged, choice.layout, choice.report, {"matching": choice.matching, "heldout loss": choice.scores}
  if method in ("average", "permute and average"):
    matching = "identity" if method == "average" else "weight"
    return *mj.merge.pleas(apply_fn, va, vb, batches, matching=matching, least_squares_fit=False, **options), {}
  if method == "ZipIt!":
    merged, layout, alloc = mj.merge.zipit(apply_fn, va, vb, batches, budget=budget, spec=spec, heads=heads,
                                           build_fn=options["build_fn"], progress=False)
    return merged, layout, mj.merge.Report(alloc, [], {}), {}
  if method == "PLeaS-free":
    return *mj.merge.pleas(apply_fn, va, vb, _batches(free_x, config.pleas.batch_size), matching="activation",
                           **options), {}
  matching = {"PLeaS (weight)": "weight", "PLeaS (activation)": "activation"}[method]
  return *mj.merge.pleas(apply_fn, va, vb, batches, matching=matching, **options), {}


def _merge_rows(config, model, kwargs, x, free_x, va, vb, seed: int, score, heldout: Heldout) -> list[dict]:
  """One row per budget and method of `config.pleas`: its costs, time and `score(merged_model, merged)`."""
  rows = []
  for budget in config.pleas.budgets:
    for method in config.pleas.methods:
      t0 = time.perf_counter()
      merged, layout, report, notes = merge_pair(config, model, kwargs, x, free_x, va, vb, budget, method, heldout)
      merged_model = mj.models.build(config.model.name, layout, **kwargs)
      row = {"seed": seed, "budget": budget, "method": method, "flops": report.allocation.cost,
             "params": _nonzero(merged) / mj.tree.num_params(va), "seconds": time.perf_counter() - t0,
             **notes, **score(merged_model, merged)}
      rows.append(row)
      logging.info("seed %d budget %.1f %s: %s", seed, budget, method, row)
  return rows


def _check_selection(config) -> None:
  """Raises ValueError for PLeaS (select)'s fields, before any training."""
  if not (isinstance(config.pleas.heldout, float) and 0.0 < config.pleas.heldout < 1.0):
    raise ValueError(f"pleas.heldout must be a fraction in (0, 1), got {config.pleas.heldout!r}")
  try:
    pleas_select.check_candidates(config.pleas.candidates)
  except ValueError as e:
    raise ValueError(f"pleas.candidates: {e}") from None


def run(config, workdir):
  _check_selection(config)
  if config.split.kind == "text_domains":
    return run_text(config, workdir)
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
    x = np.concatenate([m.task.x_train for m in members])
    free_x = _free_inputs(config, x)
    splits = [_heldout_indices(len(m.task.x_train), config.pleas.heldout, config.data_seed + i)
              for i, m in enumerate(members)]
    x_held = np.concatenate([m.task.x_train[h] for m, (_, h) in zip(members, splits)])
    y_held = np.concatenate([m.task.y_train[h] for m, (_, h) in zip(members, splits)])
    heldout = Heldout(
        np.concatenate([m.task.x_train[f] for m, (f, _) in zip(members, splits)]),
        lambda merged_model, merged: _cross_entropy(
            evaluate.logits_in_chunks(evaluate.jit_logits(logits_fn(merged_model), merged), x_held), y_held))
    for method, fn, features in (
        ("model A", fa, ha), ("model B", fb, hb),
        ("ensemble", lambda x: evaluate.ensemble_logits([fa(x), fb(x)]),
         lambda x: np.concatenate([np.asarray(ha(x)), np.asarray(hb(x))], -1))):
      results.append({"seed": seed, "budget": None, "method": method, **score(fn, features)})
    results += _merge_rows(
        config, model, kwargs, x, free_x, va, vb, seed,
        lambda merged_model, merged: score(
            evaluate.jit_logits(logits_fn(merged_model), merged),
            _head_features(functools.partial(merged_model.apply, train=False), merged)),
        heldout)
  return _write_results(config, workdir, results, "joint", "joint accuracy", start)


def _write_results(config, workdir: pathlib.Path, results, metric: str, ylabel: str, start: float):
  """Prints the summary, writes pleas.json and pleas.png (`metric` against budget); returns the summary."""
  summary = summarise(results)
  print(format_summary(summary))
  (workdir / "pleas.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
  lines = {m: np.array([summary[m][str(b)][metric][0] for b in config.pleas.budgets])
           for m in config.pleas.methods}
  lines["ensemble"] = np.full(len(config.pleas.budgets), summary["ensemble"]["None"][metric][0])
  plot = plots.curves(np.array(config.pleas.budgets), lines, workdir / "pleas.png",
                     f"{config.model.name} on {config.dataset}: merging under a budget",
                     xlabel="budget (FLOPs relative to one model)", ylabel=ylabel)
  print(f"\nwrote {plot} and {workdir / 'pleas.json'} ({time.perf_counter() - start:.0f} s)")
  return summary


FREE_TEXT = ("reversed", "shuffled", "uniform")  # config.pleas.free_text of a language-model pair


def _check_text_config(config, dataset) -> None:
  """Raises ValueError for a text config the experiment cannot run, before any training."""
  if config.pleas.heads != "shared" or config.pleas.probe:
    raise ValueError(f"{config.dataset}: language models have no task heads or probes: set pleas.heads='shared'"
                     f" and pleas.probe=False (got {config.pleas.heads!r} and {config.pleas.probe})")
  if len(config.members) != len(dataset.domains):
    raise ValueError(f"config.members names {len(config.members)} models but {config.dataset} has"
                     f" {len(dataset.domains)} domains {dataset.domains}")
  if config.pleas.free_text not in FREE_TEXT:
    raise ValueError(f"pleas.free_text must be one of {FREE_TEXT}, got {config.pleas.free_text!r}")
  if not 0 <= config.warmup_steps < config.num_steps:
    raise ValueError(f"warmup_steps {config.warmup_steps} not in [0, num_steps={config.num_steps})")
  for field in ("merge_windows", "eval_windows"):
    if not (isinstance(config.pleas[field], int) and config.pleas[field] >= 1):
      raise ValueError(f"pleas.{field} must be an int >= 1, got {config.pleas[field]!r}")
  smallest = min(len(dataset.domain(d).x_train) for d in dataset.domains)
  if not 1 <= config.batch_size <= smallest:
    raise ValueError(f"batch_size {config.batch_size} not in [1, {smallest}] (the smallest domain)")


def _free_text(config, x: np.ndarray) -> np.ndarray:
  """i32[n, t] -> i32[n, t]: the windows PLeaS-free reads (`config.pleas.free_text`)."""
  rng = np.random.default_rng(config.seed)
  if config.pleas.free_text == "reversed":
    return np.ascontiguousarray(x[:, ::-1])
  if config.pleas.free_text == "shuffled":
    return rng.permutation(x.reshape(-1)).reshape(x.shape)
  return rng.integers(0, 256, x.shape, dtype=x.dtype)


def _subset(n: int, k: int, seed: int) -> np.ndarray:
  """k of range(n) (all if k >= n), drawn with `seed`, in order."""
  return np.arange(n) if k >= n else np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def train_text_pair(config, workdir: pathlib.Path, domains) -> tuple[Any, list]:
  """One language model per domain (member i: seed `config.seed + i`); returns (model, [va, vb]).

  A member whose `<workdir>/<member>/model` exists is reused, not retrained;
  otherwise it is trained with `experiments.train`'s optimizer, step and
  batch stream, and saved there (no intermediate checkpoints: the runs are
  minutes long).
  """
  model = mj.models.build(config.model.name, **train.model_config(config))
  optimizer = train.make_optimizer(config)
  step_fn = None
  out = []
  for i, (name, domain) in enumerate(zip(config.members, domains)):
    path = workdir / name / "model"
    if path.exists():
      logging.info("%s: reusing %s", name, path)
      out.append(mj.io.restore(path))
      continue
    seed = config.seed + i
    variables = train.init_variables(model, seed, domain.x_train)
    state = {**variables, "opt_state": optimizer.init(variables["params"]), "step": jnp.int32(0)}
    step_fn = step_fn or train.make_train_step(model, optimizer)
    stream = train.train_batches(config, domain, seed, 0)
    t0 = time.perf_counter()
    for step in range(1, config.num_steps + 1):
      state, loss = step_fn(state, *next(stream))
      if step % config.log_every == 0 or step == config.num_steps:
        logging.info("%s: step %d/%d  loss %.4f  %.1f steps/s", name, step, config.num_steps, float(loss),
                     step / (time.perf_counter() - t0))
    variables = {"params": state["params"]}
    mj.io.save(path, variables, metadata={
        "model": config.model.name, "model_config": train.model_config(config), "dataset": config.dataset,
        "data_options": config.data_options.to_dict(), "domain": domain.domains[0], "seed": seed,
        "num_steps": config.num_steps}, overwrite=True)
    out.append(variables)
  return model, out


def run_text(config, workdir):
  """The experiment on a pair of language models, one per text domain (see the module docstring)."""
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  dataset = mj.data.load(config.dataset, seed=config.data_seed, **config.data_options.to_dict())
  _check_text_config(config, dataset)
  domains = mj.data.split(dataset, config.split.kind, seed=config.data_seed)
  picks = [_subset(len(d.x_train), config.pleas.merge_windows, config.data_seed) for d in domains]
  x = np.concatenate([d.x_train[k] for d, k in zip(domains, picks)])
  splits = [_heldout_indices(len(k), config.pleas.heldout, config.data_seed + i) for i, k in enumerate(picks)]
  held = {d.domains[0]: (d.x_train[k[h]], d.y_train[k[h]]) for d, k, (_, h) in zip(domains, picks, splits)}
  heldout = Heldout(
      np.concatenate([d.x_train[k[f]] for d, k, (f, _) in zip(domains, picks, splits)]),
      lambda merged_model, merged: float(np.mean([
          evaluate.perplexity(evaluate.jit_logits(merged_model.apply, merged), hx, hy)["nll"]
          for hx, hy in held.values()])))
  tests = {}
  for d in domains:
    k = _subset(len(d.x_test), config.pleas.eval_windows, config.data_seed)
    tests[d.domains[0]] = (d.x_test[k], d.y_test[k])
  kwargs = dict(config.model.config)
  results = []
  for seed in config.pleas.seeds:
    pair_config = config.copy_and_resolve_references()
    with pair_config.unlocked():
      pair_config.seed = seed
    model, (va, vb) = train_text_pair(pair_config, workdir / f"seed{seed}", domains)
    free_x = _free_text(pair_config, x)
    fa, fb = evaluate.jit_logits(model.apply, va), evaluate.jit_logits(model.apply, vb)
    for method, fn in (("model A", fa), ("model B", fb),
                       ("ensemble", lambda ids: evaluate.ensemble_logits([fa(ids), fb(ids)]))):
      results.append({"seed": seed, "budget": None, "method": method, **text_scores(fn, tests)})
    results += _merge_rows(
        config, model, kwargs, x, free_x, va, vb, seed,
        lambda merged_model, merged: text_scores(evaluate.jit_logits(merged_model.apply, merged), tests), heldout)
  return _write_results(config, workdir, results, "ppl mean", "mean perplexity (lower is better)", start)


def text_scores(logits_fn, tests) -> dict[str, float]:
  """`{"ppl <domain>": perplexity on its test windows, ..., "ppl mean": exp(mean of their nll)}`."""
  nll = {d: evaluate.perplexity(logits_fn, x, y)["nll"] for d, (x, y) in tests.items()}
  mean = float(np.exp(np.mean(list(nll.values()))))
  return {**{f"ppl {d}": float(np.exp(v)) for d, v in nll.items()}, "ppl mean": mean}


def summarise(results):
  """method -> budget -> score -> (mean, std) over seeds."""
  out = {}
  for r in results:
    scores = {k: v for k, v in r.items()
              if k.startswith(("task", "probe", "ppl")) or k in ("joint", "flops", "params")}
    for k, v in scores.items():
      out.setdefault(r["method"], {}).setdefault(str(r["budget"]), {}).setdefault(k, []).append(v)
  return {m: {b: {k: (float(np.mean(v)), float(np.std(v))) for k, v in s.items()} for b, s in bs.items()}
          for m, bs in out.items()}


def format_summary(summary) -> str:
  """One line per method and budget: accuracies in percent, perplexities as they are."""
  lines = []
  for method, budgets in summary.items():
    for budget, scores in budgets.items():
      cells = "  ".join(f"{k} {100 * m:5.1f}±{100 * s:4.1f}" if not k.startswith("ppl") else f"{k} {m:6.2f}±{s:5.2f}"
                        for k, (m, s) in scores.items() if k.startswith(("task", "probe", "ppl")) or k == "joint")
      lines.append(f"{method:22s} budget {budget:>4s}  {cells}")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.main(run, about="PLeaS", config="experiments/configs/pleas_mlp_digits.py", workdir="workdir/pleas")
