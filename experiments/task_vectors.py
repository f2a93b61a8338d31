r"""Merging models fine-tuned from one base: task vectors, soups, Fisher, RegMean.

    python -m experiments.task_vectors \
        --config=experiments/configs/task_vectors_mlp_digits.py --workdir=/tmp/task_vectors

For every seed of `config.task_vectors.seeds`:

1. the base model is trained for `config.num_steps` on all the tasks' data
   together (with the default split, every class of the dataset), seen
   through `config.task_vectors.base_transforms` (input transforms of
   `mergejax.data.shift`, applied in order; none: the tasks' own inputs).
   A base pre-trained in a domain next to the tasks' is the setting of task
   vectors (a generic model adapted by fine-tuning); with the tasks' own
   inputs, a base on digits already scores about 99-100% task-aware on every
   two-class task and fine-tuning has nothing to add;
2. it is fine-tuned into one model per task of `config.split` (named by
   `config.members`), for `finetune.num_steps` each, keeping the base's head
   over the whole label space;
3. the multi-task model is the base fine-tuned on all the tasks' data
   together for as many steps as all the task models together;
4. the task models are merged by every method of `config.task_vectors.sweeps`
   at every point of its grid: the uniform soup (`average`), the greedy soup
   (ingredients kept by validation accuracy), task arithmetic, TIES, DARE
   (dropped task vectors, then task arithmetic), DARE-TIES, Fisher-weighted
   averaging (exact Fisher on each task's training inputs), RegMean and
   RegMean++ (Grams on each task's training inputs), LiNeS (task arithmetic
   scaled by depth, blocks in the traced read order), Consensus task
   arithmetic and TIES, SCE, DOGE, PCB, WIDEN, metrics-weighted averaging
   (weights from each task model's final training loss), OTA (Fisher-weighted
   by each task model's final Adam second moments), OPCM (continual, the task
   models arriving in one of `order` seeded orders; the spread over orders is
   printed and saved beside the table), and LoRA merges of each task vector's
   rank-r truncation (LoRA task arithmetic, LoRA-LEGO). Two compressions
   give one model per task instead, each scored on its own task and without
   a `joint` column: TALL masks (base + mask_t * the summed task vectors) and
   reversible low-rank merging (each task's LoRA from a shared basis).
   FW-merging (Frank-Wolfe over the task models' hull on the tasks'
   task-aware cross-entropy, `LOSS_BATCHES` labelled fitting batches each;
   FW-Soft learns each step's weights of the picked models on that loss by
   `fw_ada_steps` Adam steps at `fw_ada_lr`, task-wise)
   and MAP (quadratic surrogates of those losses in the task-arithmetic
   coefficients, sampled uniformly in [0, 1]; the Pareto front's point of
   best validation average is the merge; Bayesian MAP spends the same
   `map_samples` merges in `map_rounds` adaptive rounds after a first of a
   quadratic's terms; nested MAP merges the tasks pairwise by two-task fronts
   of `map_samples` merges each, equal preferences) learn from labelled
   training data.
   AdaMerging (task- and layer-wise coefficients) and Concrete TA / Concrete
   AdaMerging (a shared mask over the task vectors' entries) minimise the
   merged model's prediction entropy over each task's classes on its fitting
   inputs, unlabelled. Expert Merging (layer-wise coefficients, and with
   `em_chunks` > 0 Expert Merging++'s importance-guided chunks) aligns the
   merge's hidden states and logits with each task model's on
   `EM_CALIBRATION` of that task's fitting inputs, unlabelled. Twin-merging
   is scored per input: task arithmetic at `scale` is the shared model, each
   task's difference from it is kept at rank `twin_rank`, and a router on the
   shared model's penultimate features, trained to tell the tasks apart on
   `ROUTER_EXAMPLES` fitting inputs per task, weighs them for each input.

Every model is scored task-aware (argmax over the task's own classes) on each
task and by the mean over tasks, `average`, which settings are chosen by;
`joint` lets every class compete. A fraction `validation_fraction` of each
task's training examples is held out of all training and statistics: each
method's reported setting is the grid point with the best mean validation
`average` over seeds, and its row gives the test scores at that setting
(mean ± std over seeds). The test set never chooses anything.

Prints the table and writes `<workdir>/task_vectors.json` (every run of every
setting and seed, and the summary) and `<workdir>/task_vectors.png` (test
`average` per method, and each sweep's validation and test curves), and with
MAP `<workdir>/map_pareto_front.png` (MAP on the first two tasks alone, first
seed: the sampled merges' losses, the surrogates' front, and the front's
merges evaluated; and Bayesian MAP's samples and front from as many merges), and with layer-wise AdaMerging
`<workdir>/adamerging_coefficients.png` (the first seed's learned
coefficients at the chosen setting, one line per task over the leaves).
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import itertools
import json
import math
import pathlib
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli
from experiments import evaluate
from experiments import plots
from experiments import train
import mergejax as mj

PyTree = Any

# Method id -> (table name, the parameters its sweep gives values to).
METHODS = {
    "average": ("average", ()),
    "greedy_soup": ("greedy soup", ()),
    "task_arithmetic": ("task arithmetic", ("scale",)),
    "ties": ("TIES", ("density", "scale")),
    "dare": ("DARE", ("drop", "scale")),
    "dare_ties": ("DARE-TIES", ("drop", "density", "scale")),
    "fisher": ("Fisher", ("epsilon",)),
    "regmean": ("RegMean", ("alpha",)),
    "regmean_plus_plus": ("RegMean++", ("alpha",)),
    "lines": ("LiNeS", ("beta",)),
    "consensus_task_arithmetic": ("Consensus TA", ("k", "scale")),
    "consensus_ties": ("Consensus TIES", ("k", "density", "scale")),
    "tall_masks": ("TALL masks (per task)", ("lambda_t",)),
    "sce": ("SCE", ("density", "scale")),
    "doge": ("DOGE", ("density", "scale")),
    "pcb": ("PCB", ("density", "scale")),
    "widen": ("WIDEN", ("above_average_ratio", "calibrated_score")),
    "metric_weighted": ("metrics-weighted average", ("penalty",)),
    "ota": ("OTA (Adam curvature)", ("power",)),
    "opcm": ("OPCM (continual)", ("opcm_alpha", "order")),
    "lora_arithmetic": ("LoRA task arithmetic", ("rank", "scale")),
    "lora_lego": ("LoRA-LEGO", ("merged_rank", "rank", "scale")),
    "reversible_lora": ("reversible low-rank (per task)", ("num_basis", "rank")),
    "fw_merging": ("FW-merging", ("fw_steps", "fw_soft", "fw_line_search")),
    "fw_merging_soft": ("FW-merging (soft)", ("fw_steps", "fw_ada_lr", "fw_ada_steps")),
    "map": ("MAP (front point chosen on validation)", ("map_samples", "map_divisions")),
    "map_bayesian": ("MAP (Bayesian, front point chosen on validation)",
                     ("map_samples", "map_rounds", "map_divisions")),
    "map_nested": ("MAP (nested, equal preferences)", ("map_samples", "map_divisions")),
    "adamerging_task": ("AdaMerging (task-wise)", ("ada_lr", "ada_steps")),
    "adamerging_layer": ("AdaMerging (layer-wise)", ("ada_lr", "ada_steps")),
    "concrete_task_arithmetic": ("Concrete TA", ("mask_lr", "mask_steps", "scale")),
    "concrete_adamerging": ("Concrete AdaMerging (task-wise)", ("ada_lr", "ada_steps", "mask_lr")),
    "twin_merging": ("Twin-merging (routed per input)", ("twin_rank", "scale")),
    "expert_merging": ("Expert Merging", ("em_lr", "em_steps", "em_chunks")),
}

# Methods whose result is one model per task (compressions, not merges): each task is scored on its
# own model, and `joint` is left out.
PER_TASK = ("tall_masks", "reversible_lora")

# FW-merging and MAP read each task's first LOSS_BATCHES labelled fitting batches; MAP's two-task
# front for the plot fits MAP_2D_SAMPLES merges. Bayesian MAP draws |c| in MAP_BAYESIAN_RADIUS.
LOSS_BATCHES = 2
MAP_2D_SAMPLES = 12
MAP_BAYESIAN_RADIUS = (0.2, 1.5)

# Twin-merging's router trains ROUTER_STEPS full-batch Adam steps on ROUTER_EXAMPLES fitting inputs per
# task (labelled by task); Expert Merging calibrates on EM_CALIBRATION fitting inputs per task.
ROUTER_EXAMPLES = 256
ROUTER_STEPS = 500
EM_CALIBRATION = 32

# Parameter -> (whether a value is valid, the valid range in words).
RANGES = {
    "scale": (math.isfinite, "finite"),
    "density": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "drop": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "epsilon": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "beta": (math.isfinite, "finite"),
    "k": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    "lambda_t": (lambda v: 0 <= v < math.inf, "finite and >= 0"),
    "above_average_ratio": (math.isfinite, "finite"),
    "calibrated_score": (math.isfinite, "finite"),
    "penalty": (lambda v: 0 <= v < math.inf, "finite and >= 0"),
    "power": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "opcm_alpha": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "order": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    "rank": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "merged_rank": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "num_basis": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "fw_steps": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "fw_soft": (lambda v: v in (0, 1), "0 (hard) or 1 (soft)"),
    "fw_line_search": (lambda v: v in (0, 1), "0 (2/(t+2)) or 1 (line search)"),
    "fw_ada_lr": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "fw_ada_steps": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    "map_samples": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "map_divisions": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "map_rounds": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "ada_lr": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "ada_steps": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    "mask_lr": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "mask_steps": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    "twin_rank": (lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1"),
    "em_lr": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "em_steps": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
    "em_chunks": (lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
}

BASE, MULTI_TASK, OWN_TASK = "base", "multi-task", "fine-tuned, own task"
MULTI_TASK_MEMBER = "multitask"  # The multi-task model's directory.


def hold_out(task: mj.data.Task, fraction: float, seed: int) -> tuple[mj.data.Task, mj.data.Task]:
  """Splits a task's training examples into a fitting part and a validation slice.

  Args:
    task: the task.
    fraction: the share of its training examples to hold out, in (0, 1).
    seed: seeds which examples are held out.

  Returns:
    `(fit, validation)`: `fit` is the task with only the kept training
    examples; `validation` is `fit` with the held-out examples as its test
    set, so scoring it (`evaluate.score_model`) scores the validation slice.
  """
  n = len(task.y_train)
  held = round(fraction * n)
  if not 1 <= held < n:
    raise ValueError(f"validation_fraction {fraction} holds out {held} of {task.name}'s {n} training"
                     " examples; it must hold out at least one and keep at least one")
  order = np.random.default_rng(seed).permutation(n)
  keep, val = np.sort(order[held:]), np.sort(order[:held])
  fit = dataclasses.replace(task, x_train=task.x_train[keep], y_train=task.y_train[keep])
  return fit, dataclasses.replace(fit, x_test=task.x_train[val], y_test=task.y_train[val])


def union(tasks: Sequence[mj.data.Task], name: str) -> mj.data.Task:
  """All the tasks' training and test examples together, as one task."""
  return mj.data.Task(
      name=name,
      x_train=np.concatenate([t.x_train for t in tasks]),
      y_train=np.concatenate([t.y_train for t in tasks]),
      x_test=np.concatenate([t.x_test for t in tasks]),
      y_test=np.concatenate([t.y_test for t in tasks]),
      num_classes=tasks[0].num_classes,
      classes=tuple(sorted({c for t in tasks for c in t.classes})),
  )


def grid(method: str, sweep: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
  """Every setting of a method's sweep `{parameter: values}`.

  Parameters come in the order of `METHODS` (config dicts sort their keys),
  the last varying fastest.
  """
  params = METHODS[method][1]
  return [dict(zip(params, map(float, values))) for values in itertools.product(*(sweep[p] for p in params))]


def swept_methods(config) -> list[str]:
  """The methods of `config.task_vectors.sweeps`, in the order of `METHODS`."""
  return [m for m in METHODS if m in config.task_vectors.sweeps]


def check_config(config, members: Sequence[train.Member]) -> None:
  """Raises ValueError for anything of `config.task_vectors` that is wrong, before any work."""
  tv = config.task_vectors
  names = [m.name for m in members]
  if len(set(names)) != len(names) or {BASE, MULTI_TASK_MEMBER} & set(names):
    raise ValueError(f"config.members {names} must be distinct and not {BASE!r} or {MULTI_TASK_MEMBER!r}")
  if not tv.seeds:
    raise ValueError("config.task_vectors.seeds is empty")
  if not 0 < tv.validation_fraction < 1:
    raise ValueError(f"validation_fraction {tv.validation_fraction} not in (0, 1)")
  if not 0 <= tv.finetune.warmup_steps < tv.finetune.num_steps:
    raise ValueError(f"finetune.warmup_steps {tv.finetune.warmup_steps} not in [0, finetune.num_steps"
                     f"={tv.finetune.num_steps})")
  if tv.batch_size < 1:
    raise ValueError(f"task_vectors.batch_size {tv.batch_size} < 1")
  for method, sweep in tv.sweeps.items():
    if method not in METHODS:
      raise ValueError(f"sweeps: unknown method {method!r}; known: {sorted(METHODS)}")
    params = METHODS[method][1]
    if set(sweep) != set(params):
      raise ValueError(f"sweeps.{method} sweeps {sorted(sweep)}; it must give values to {params}")
    for param, values in sweep.items():
      valid, words = RANGES[param]
      if not values or not all(valid(float(v)) for v in values):
        raise ValueError(f"sweeps.{method}.{param} = {values}: needs values {words}")
  if "map_bayesian" in tv.sweeps:
    sweep, first = tv.sweeps["map_bayesian"], (len(names) + 1) * (len(names) + 2) // 2
    if min(sweep["map_samples"]) < first + max(sweep["map_rounds"]):
      raise ValueError(f"sweeps.map_bayesian.map_samples = {sweep['map_samples']}: each must cover a quadratic's"
                       f" {first} terms in {len(names)} coefficients, then at least one merge per round"
                       f" (map_rounds up to {max(sweep['map_rounds'])})")


def phase_config(config, num_steps: int, learning_rate: float, warmup_steps: int):
  """`config` with another training length and learning rate (for fine-tuning)."""
  phase = config.copy_and_resolve_references()
  with phase.unlocked():
    phase.num_steps, phase.learning_rate, phase.warmup_steps = num_steps, learning_rate, warmup_steps
  return phase


def pretraining_task(config, fit: Sequence[mj.data.Task]) -> mj.data.Task:
  """All the tasks' fitting data together, through `config.task_vectors.base_transforms`.

  Transform k is seeded `config.data_seed + k`.
  """
  task = union(fit, "all tasks")
  for k, (name, options) in enumerate(config.task_vectors.base_transforms):
    task = mj.data.shift(task, name, seed=config.data_seed + k, **dict(options))
  return task


class Trained(NamedTuple):
  """One seed's models: the base, the task models fine-tuned from it, the multi-task model."""

  base: PyTree
  tuned: list[PyTree]
  multi_task: PyTree
  final_losses: list[float]  # Each task model's last logged training loss.
  adam_states: Callable[[], list[PyTree]]  # Each task model's final optax state, read when called.


def train_models(config, model, members: Sequence[train.Member], fit: Sequence[mj.data.Task],
                 pretraining: mj.data.Task, seed: int, workdir: pathlib.Path) -> Trained:
  """The base, the task models fine-tuned from it, and the multi-task model of one seed.

  Each is trained or reused under `workdir` (`train.train_member`); seeds:
  the base `seed` (trained on `pretraining`), task model i `seed + 1 + i`,
  the multi-task model `seed + 1 + len(fit)` (trained on every task's
  fitting data).
  """
  ft = config.task_vectors.finetune
  everything = union(fit, "all tasks")
  workdir.mkdir(parents=True, exist_ok=True)
  base, _ = train.train_member(config, model, train.Member(BASE, pretraining, seed), workdir)
  tune = phase_config(config, ft.num_steps, ft.learning_rate, ft.warmup_steps)
  tuned, metrics = zip(*(
      train.train_member(tune, model, train.Member(m.name, task, seed + 1 + i), workdir, init=base)
      for i, (m, task) in enumerate(zip(members, fit))))
  multi_config = phase_config(config, len(fit) * ft.num_steps, ft.learning_rate, ft.warmup_steps)
  multi_task, _ = train.train_member(
      multi_config, model, train.Member(MULTI_TASK_MEMBER, everything, seed + 1 + len(fit)), workdir, init=base)
  adam_states = lambda: [train.final_optimizer_state(tune, workdir, m.name, v) for m, v in zip(members, tuned)]
  return Trained(base, list(tuned), multi_task, [m["losses"][-1][1] for m in metrics], adam_states)


class PerTask(NamedTuple):
  """One model per task (a compression such as TALL masks, not a merge): task i is scored on models[i]."""

  models: list[PyTree]


class PerInput(NamedTuple):
  """A model that differs per input (Twin-merging's routed merge): scored through its own logits."""

  logits: Callable[[np.ndarray], np.ndarray]  # x f32[n, ...] -> f32[n, num_classes]


def make_scorer(apply_fn, tasks: Sequence[mj.data.Task], columns: Sequence[str]
                ) -> Callable[[PyTree | PerTask], dict[str, float]]:
  """variables -> {column of each task: task-aware accuracy, "average": their mean, "joint": ...}.

  `PerTask` models score each task on its own model and have no `joint`;
  `PerInput` models score through their own logits function.
  `apply_fn` is compiled once per input shape, with the variables as an
  argument, so scoring many merges compiles nothing new.
  """
  logits = jax.jit(apply_fn)

  def score(variables):
    if isinstance(variables, PerTask):
      row = {c: evaluate.score_model(functools.partial(logits, v), [t])[t.name]
             for c, t, v in zip(columns, tasks, variables.models)}
      return {**row, "average": float(np.mean(list(row.values())))}
    fn = variables.logits if isinstance(variables, PerInput) else functools.partial(logits, variables)
    scores = evaluate.score_model(fn, tasks)
    row = {c: scores[t.name] for c, t in zip(columns, tasks)}
    return {**row, "average": float(np.mean(list(row.values()))), "joint": scores["joint"]}

  return score


def task_aware_loss(apply_fn) -> Callable[[PyTree, tuple], jax.Array]:
  """(variables, (x, y, allowed: bool[classes])) -> cross-entropy over the task's own classes.

  The loss of the task-aware accuracy the experiment scores: logits outside
  the task's classes are masked out.
  """
  def loss(variables, batch):
    x, y, allowed = batch
    logits = jnp.where(allowed, apply_fn(variables, x), -1e9)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def merge_fns(config, apply_fn, trained: Trained, fit: Sequence[mj.data.Task], seed: int,
              validation_average: Callable[[PyTree], float]
              ) -> dict[str, Callable[..., tuple[PyTree | PerTask, dict]]]:
  """Method id -> (setting -> (merged variables, notes for the JSON)).

  Statistics (Fishers, Grams, Adam states, LoRA factors, LiNeS's blocks) are
  computed the first time a method needs them, once per seed; Fishers and
  Grams on each task's fitting inputs.
  """
  base, tuned = trained.base, trained.tuned
  key = jax.random.key(seed)
  inputs = [cli.process_shard(functools.partial(mj.data.batches, t.x_train, batch_size=config.task_vectors.batch_size,
                                                shuffle=False)) for t in fit]

  def timed(name, fn):
    start = time.perf_counter()
    out = fn()
    logging.info("seed %d: %s in %.1f s", seed, name, time.perf_counter() - start)
    return out

  @functools.cache
  def fishers():
    return timed("exact Fishers", lambda: [mj.fisher(apply_fn, v, x, kind="exact", progress=False)
                                           for v, x in zip(tuned, inputs)])

  @functools.cache
  def grams():
    return timed("RegMean Grams", lambda: [mj.merge.regmean_grams(apply_fn, v, x) for v, x in zip(tuned, inputs)])

  @functools.cache
  def blocks():
    return mj.merge.blocks_in_read_order(apply_fn, base, fit[0].x_train[:1])

  @functools.cache
  def second_moments():
    """Each task model's Adam second moments at the end of fine-tuning; other collections weigh 1."""
    return [{**jax.tree.map(np.ones_like, v), "params": mj.merge.adam_second_moments(state, v["params"])}
            for v, state in zip(tuned, trained.adam_states())]

  @functools.cache
  def adapters(rank):
    return [mj.merge.lora_extract(base, v, int(rank)) for v in tuned]

  def greedy_soup():
    soup, chosen = mj.merge.greedy_soup(tuned, validation_average)
    return soup, {"ingredients": [config.members[i] for i in chosen]}

  def tall_masks(lambda_t):
    masks = mj.merge.tall_masks(base, tuned, lambdas=lambda_t)
    multitask = mj.merge.multitask_vector(base, tuned)
    kept = [float(np.mean(np.concatenate([np.ravel(m) for m in jax.tree.leaves(mask)]))) for mask in masks]
    return PerTask([mj.merge.tall_reconstruct(base, multitask, m) for m in masks]), {"kept_fraction": kept}

  def opcm(opcm_alpha, order):
    """OPCM with the task models arriving in the `order`-th seeded order."""
    arrival = [int(i) for i in jax.random.permutation(jax.random.fold_in(key, 1 + int(order)), len(tuned))]
    merged = mj.merge.merge_in_order(mj.merge.opcm(opcm_alpha), base, tuned, arrival)
    return merged, {"arrival": [config.members[i] for i in arrival]}

  @functools.cache
  def task_vectors():
    return [mj.merge.task_vector(base, v) for v in tuned]

  @functools.cache
  def labelled():
    """Each task's first LOSS_BATCHES labelled fitting batches, with its classes as a mask (FW-merging, MAP).

    Batches of one size (at most the smallest task's examples; the remainder
    dropped), so the loss compiles once.
    """
    size = min(config.task_vectors.batch_size, *(len(t.y_train) for t in fit))
    masks = [np.isin(np.arange(t.num_classes), t.classes) for t in fit]
    return [[(x, y, mask) for x, y in itertools.islice(
        mj.data.batches(t.x_train, t.y_train, batch_size=size, shuffle=False, drop_remainder=True),
        LOSS_BATCHES)] for t, mask in zip(fit, masks)]

  loss_fn = task_aware_loss(apply_fn)

  def fw_merging(fw_steps, fw_soft, fw_line_search):
    merged, trace = mj.merge.fw_merge(
        loss_fn, base, task_vectors(), labelled(), steps=int(fw_steps), variant="soft" if fw_soft else "hard",
        step_size="line_search" if fw_line_search else "harmonic")
    return merged, {"fw_chosen": [[config.members[k] for k in ks] for ks in trace.chosen],
                    "fw_losses": trace.losses.tolist(), "fw_gaps": trace.gaps.tolist()}

  def fw_merging_soft(fw_steps, fw_ada_lr, fw_ada_steps):
    """FW-Soft: each task picks a vertex, the step's weights are learned on the tasks' loss (task-wise)."""
    merged, trace = mj.merge.fw_merge(
        loss_fn, base, task_vectors(), labelled(), steps=int(fw_steps), variant="soft",
        soft={"steps": int(fw_ada_steps), "learning_rate": fw_ada_lr})
    return merged, {"fw_chosen": [[config.members[k] for k in ks] for ks in trace.chosen],
                    "fw_weights": [w.tolist() for w in trace.weights],
                    "fw_losses": trace.losses.tolist(), "fw_gaps": trace.gaps.tolist()}

  def map_front(coefficients, preferences, pool, data):
    """MAP over `pool`'s coefficients in [0, 1]: the samples' losses, the front, the front's coefficients."""
    sampled = mj.merge.map_losses(loss_fn, base, pool, coefficients, data)
    surrogates = mj.merge.map_surrogates(coefficients, sampled)
    return sampled, mj.merge.map_pareto_front(surrogates, preferences, bounds=(0.0, 1.0))

  @functools.cache
  def map_front_2d():
    """MAP on the first two tasks alone (their task vectors, the others' at 0), for the plot."""
    pool, data = task_vectors()[:2], labelled()[:2]
    coefficients = np.random.default_rng(seed).uniform(0, 1, size=(MAP_2D_SAMPLES, 2))
    sampled, front = map_front(coefficients, mj.merge.map_preferences(2, 10), pool, data)
    actual = mj.merge.map_losses(loss_fn, base, pool, front.coefficients, data)
    # Bayesian MAP with the same budget: a quadratic's 6 terms, then two adaptive rounds.
    rest = MAP_2D_SAMPLES - 6
    adaptive = mj.merge.map_bayesian(lambda c: mj.merge.map_losses(loss_fn, base, pool, c, data),
                                     jax.random.fold_in(key, 4), 2, (6, rest // 2, rest - rest // 2),
                                     radius=MAP_BAYESIAN_RADIUS)
    adaptive_front = mj.merge.map_pareto_front(mj.merge.map_surrogates(adaptive.coefficients, adaptive.losses),
                                               mj.merge.map_preferences(2, 10), bounds=(0.0, 1.0))
    return {"tasks": list(config.members[:2]), "sampled": sampled.tolist(), "coefficients": front.coefficients.tolist(),
            "predicted": front.losses.tolist(), "actual": actual.tolist(),
            "bayesian_sampled": adaptive.losses.tolist(), "bayesian_predicted": adaptive_front.losses.tolist()}

  def map_merge(map_samples, map_divisions):
    """MAP's front over every task's coefficient; the front point of best validation average."""
    coefficients = np.random.default_rng(seed).uniform(0, 1, size=(int(map_samples), len(tuned)))
    _, front = map_front(coefficients, mj.merge.map_preferences(len(tuned), int(map_divisions)), task_vectors(),
                         labelled())
    merges = [mj.tree.add(base, mj.tree.weighted_sum(task_vectors(), c)) for c in front.coefficients]
    best = int(np.argmax([validation_average(m) for m in merges]))
    notes = {"map_coefficients": front.coefficients[best].tolist(), "map_front_size": len(merges),
             "map_evaluations": int(map_samples)}
    if seed == config.task_vectors.seeds[0] and len(tuned) >= 2:
      notes["map_front_2d"] = map_front_2d()
    return merges[best], notes

  def evaluate_losses(coefficients):
    return mj.merge.map_losses(loss_fn, base, task_vectors(), coefficients, labelled())

  def map_bayesian(map_samples, map_rounds, map_divisions):
    """Bayesian MAP with MAP's budget of map_samples merges: a quadratic's terms first, the rest in
    map_rounds adaptive rounds; then MAP's front in [0, 1] and its point of best validation average."""
    first = (len(tuned) + 1) * (len(tuned) + 2) // 2
    rest = int(map_samples) - first  # >= map_rounds (check_config)
    schedule = [first] + [rest // int(map_rounds) + (r < rest % int(map_rounds)) for r in range(int(map_rounds))]
    samples = mj.merge.map_bayesian(evaluate_losses, jax.random.fold_in(key, 2), len(tuned), schedule,
                                    radius=MAP_BAYESIAN_RADIUS)
    front = mj.merge.map_pareto_front(mj.merge.map_surrogates(samples.coefficients, samples.losses),
                                      mj.merge.map_preferences(len(tuned), int(map_divisions)), bounds=(0.0, 1.0))
    merges = [mj.tree.add(base, mj.tree.weighted_sum(task_vectors(), c)) for c in front.coefficients]
    best = int(np.argmax([validation_average(m) for m in merges]))
    return merges[best], {"map_coefficients": front.coefficients[best].tolist(), "map_front_size": len(merges),
                          "map_evaluations": len(samples.losses), "map_schedule": schedule}

  def map_nested(map_samples, map_divisions):
    """Nested MAP: pairwise fronts in [0, 1]^2 of map_samples merges each, equal preferences."""
    result = mj.merge.map_nested(evaluate_losses, jax.random.fold_in(key, 3), len(tuned), samples=int(map_samples),
                                 divisions=int(map_divisions))
    merged = mj.tree.add(base, mj.tree.weighted_sum(task_vectors(), result.coefficients))
    return merged, {"map_coefficients": result.coefficients.tolist(), "map_evaluations": result.evaluations,
                    "map_pairs": [[[config.members[i] for i in g] for g in s.groups] for s in result.steps]}

  def reversible_lora(num_basis, rank):
    merged = mj.merge.reversible_merge(adapters(rank), int(num_basis))
    return PerTask([mj.merge.lora_apply(base, mj.merge.reversible_task(merged, t)) for t in range(len(tuned))]), {}

  # AdaMerging and Concrete: entropy on each task's fitting inputs (unlabelled) over its own classes.
  unlabelled = [t.x_train for t in fit]
  task_classes = [t.classes for t in fit]

  def mask_notes(mask):
    return {"mask_mean": float(np.mean(np.concatenate([np.ravel(m) for m in jax.tree.leaves(mask)])))}

  def adamerging(granularity, ada_lr, ada_steps):
    """Layer-wise: one coefficient per leaf (FusionBench's per parameter tensor)."""
    merged, lam = mj.merge.adamerging(apply_fn, base, tuned, unlabelled, granularity=granularity,
                                      steps=int(ada_steps), learning_rate=ada_lr, classes=task_classes)
    return merged, {"coefficients": np.asarray(lam).tolist()}

  def concrete_task_arithmetic(mask_lr, mask_steps, scale):
    merged, mask = mj.merge.concrete_task_arithmetic(
        apply_fn, base, tuned, unlabelled, key=key, scale=scale, steps=int(mask_steps),
        learning_rate=mask_lr, classes=task_classes)
    return merged, mask_notes(mask)

  def concrete_adamerging(ada_lr, ada_steps, mask_lr):
    """The mask's meta-learning and AdaMerging under it take ada_steps each."""
    merged, lam, mask = mj.merge.concrete_adamerging(
        apply_fn, base, tuned, unlabelled, key=key, mask_steps=int(ada_steps), mask_learning_rate=mask_lr,
        steps=int(ada_steps), learning_rate=ada_lr, classes=task_classes)
    return merged, {"coefficients": np.asarray(lam).tolist(), **mask_notes(mask)}

  # Twin-merging: the shared model is task arithmetic at `scale`; the router reads the shared model's
  # input to its last kernel and learns each input's task from ROUTER_EXAMPLES fitting inputs per task.
  @functools.cache
  def shared_features():
    x = fit[0].x_train[:1]
    feats = mj.capture(apply_fn)(base, x)[1]
    last = [p for p in mj.trace.read_order(apply_fn, base, x) if p in feats][-1]
    return jax.jit(lambda variables, x: mj.capture(apply_fn)(variables, x)[1][last])

  def twin_merging(twin_rank, scale):
    shared = mj.merge.task_arithmetic(base, tuned, scale=scale)
    parts = mj.merge.twin_parts(shared, tuned, int(twin_rank))
    features = functools.partial(shared_features(), shared)
    x = np.concatenate([t.x_train[:ROUTER_EXAMPLES] for t in fit])
    task = np.concatenate([np.full(len(t.x_train[:ROUTER_EXAMPLES]), i) for i, t in enumerate(fit)])
    router = mj.merge.twin_router_train(features(x), task, len(tuned), key=key, steps=ROUTER_STEPS)

    def logits(x):
      weights = jax.nn.softmax(mj.merge.twin_router(router, features(x)))
      return np.asarray(mj.merge.twin_apply(apply_fn, parts, weights, x, chunk=64))

    routed = np.argmax(mj.merge.twin_router(router, features(x)), -1)
    return PerInput(logits), {"router_fit_accuracy": float(np.mean(routed == task))}

  # Expert Merging(++): alignment with each task model on EM_CALIBRATION fitting inputs of its task
  # (unlabelled), hidden states = every kernel's input, one coefficient per task and layer (block).
  @functools.cache
  def hidden_fn():
    return mj.capture(apply_fn)

  def expert_merging(em_lr, em_steps, em_chunks):
    merged, info = mj.merge.expert_merging(
        hidden_fn(), base, tuned, [t.x_train[:EM_CALIBRATION] for t in fit], blocks=blocks(),
        chunks=int(em_chunks), steps=int(em_steps), learning_rate=em_lr)
    losses = np.asarray(info.losses)
    return merged, {"coefficients": np.asarray(info.layer_coefficients).tolist(), "chunks": info.chunks.tolist(),
                    "em_loss_first_last": [float(losses[0]), float(losses[-1])] if losses.size else []}

  return {
      "average": lambda: (mj.merge.average(tuned), {}),
      "greedy_soup": greedy_soup,
      "task_arithmetic": lambda scale: (mj.merge.task_arithmetic(base, tuned, scale=scale), {}),
      "ties": lambda density, scale: (mj.merge.ties(base, tuned, density=density, scale=scale), {}),
      "dare": lambda drop, scale: (mj.merge.dare(base, tuned, drop=drop, key=key, scale=scale), {}),
      "dare_ties": lambda drop, density, scale: (
          mj.merge.dare_ties(base, tuned, drop=drop, density=density, key=key, scale=scale), {}),
      "fisher": lambda epsilon: (mj.merge.fisher(tuned, fishers(), epsilon=epsilon), {}),
      "regmean": lambda alpha: (mj.merge.regmean(tuned, grams(), alpha=alpha), {}),
      "regmean_plus_plus": lambda alpha: (mj.merge.regmean_plus_plus(apply_fn, tuned, inputs, alpha=alpha), {}),
      "lines": lambda beta: (mj.merge.lines(base, tuned, blocks=blocks(), beta=beta), {}),
      "consensus_task_arithmetic": lambda k, scale: (
          mj.merge.consensus_task_arithmetic(base, tuned, k=int(k), scale=scale), {}),
      "consensus_ties": lambda k, density, scale: (
          mj.merge.consensus_ties(base, tuned, k=int(k), density=density, scale=scale), {}),
      "tall_masks": tall_masks,
      "sce": lambda density, scale: (mj.merge.sce(base, tuned, density=density, scale=scale), {}),
      "doge": lambda density, scale: (mj.merge.doge(base, tuned, density=density, scale=scale), {}),
      "pcb": lambda density, scale: (mj.merge.pcb(base, tuned, density=density, scale=scale), {}),
      "widen": lambda above_average_ratio, calibrated_score: (
          mj.merge.widen(base, tuned, above_average_ratio=above_average_ratio, calibrated_score=calibrated_score),
          {}),
      "metric_weighted": lambda penalty: (
          mj.merge.metric_weighted_average(tuned, trained.final_losses, penalty=penalty),
          {"weights": mj.merge.metric_weights(trained.final_losses, penalty=penalty).tolist()}),
      "ota": lambda power: (mj.merge.ota(tuned, second_moments(), power=power), {}),
      "opcm": opcm,
      "lora_arithmetic": lambda rank, scale: (
          mj.merge.lora_apply(base, mj.merge.lora_sum(adapters(rank), scale=scale)), {}),
      "lora_lego": lambda merged_rank, rank, scale: (
          mj.merge.lora_apply(base, mj.merge.lora_lego(adapters(rank), int(merged_rank), key=key), scale=scale),
          {}),
      "reversible_lora": reversible_lora,
      "fw_merging": fw_merging,
      "fw_merging_soft": fw_merging_soft,
      "map": map_merge,
      "map_bayesian": map_bayesian,
      "map_nested": map_nested,
      "adamerging_task": lambda ada_lr, ada_steps: adamerging("task", ada_lr, ada_steps),
      "adamerging_layer": lambda ada_lr, ada_steps: adamerging("layer", ada_lr, ada_steps),
      "concrete_task_arithmetic": concrete_task_arithmetic,
      "concrete_adamerging": concrete_adamerging,
      "twin_merging": twin_merging,
      "expert_merging": expert_merging,
  }


def run_seed(config, model, members, fit, validation, pretraining, seed: int, workdir: pathlib.Path
             ) -> list[dict]:
  """Trains one seed's models, merges them at every setting, and scores everything."""
  trained = train_models(config, model, members, fit, pretraining, seed, workdir / f"seed{seed}")
  base, tuned = trained.base, trained.tuned
  apply_fn = functools.partial(model.apply, train=False)
  columns = list(config.members)
  score_validation = make_scorer(apply_fn, validation, columns)
  score_test = make_scorer(apply_fn, fit, columns)  # The fitting tasks hold the test sets.

  def row(method, variables, setting=None, **notes):
    return {"seed": seed, "method": method, "setting": setting or {}, **notes,
            "validation": score_validation(variables), "test": score_test(variables)}

  runs = [row(BASE, base), row(MULTI_TASK, trained.multi_task)]
  tuned_rows = [row(f"fine-tuned {name}", v) for name, v in zip(columns, tuned)]
  own = {split: {c: r[split][c] for c, r in zip(columns, tuned_rows)} for split in ("validation", "test")}
  runs += tuned_rows + [{"seed": seed, "method": OWN_TASK, "setting": {},
                         **{s: {**o, "average": float(np.mean(list(o.values())))} for s, o in own.items()}}]
  fns = merge_fns(config, apply_fn, trained, fit, seed, lambda v: score_validation(v)["average"])
  for method in swept_methods(config):
    for setting in grid(method, config.task_vectors.sweeps[method]):
      start = time.perf_counter()
      merged, notes = fns[method](**setting)
      runs.append(row(METHODS[method][0], merged, setting, seconds=time.perf_counter() - start, **notes))
      logging.info("seed %d %s %s: validation average %.4f, test average %.4f", seed, method, setting,
                   runs[-1]["validation"]["average"], runs[-1]["test"]["average"])
  return runs


def summarise(runs: Sequence[dict]) -> dict[str, dict]:
  """Per method: the setting of best mean validation average, its test scores, and the sweep.

  Returns:
    `{method: {"setting", "validation": {column: (mean, std)}, "test":
    {column: (mean, std)}, "sweep": [{"setting", "validation": mean average,
    "test": mean average}]}}`, means and stds over seeds, methods in the
    order of their first run.
  """
  by_setting: dict[str, dict[str, list[dict]]] = {}
  for r in runs:
    by_setting.setdefault(r["method"], {}).setdefault(json.dumps(r["setting"]), []).append(r)

  def stats(rows, split):
    return {c: (float(np.mean([r[split][c] for r in rows])), float(np.std([r[split][c] for r in rows])))
            for c in rows[0][split]}

  out = {}
  for method, settings in by_setting.items():
    sweep = [{"setting": json.loads(s), "validation": stats(rows, "validation")["average"][0],
              "test": stats(rows, "test")["average"][0]} for s, rows in settings.items()]
    best = max(range(len(sweep)), key=lambda i: sweep[i]["validation"])  # The first of equals.
    rows = list(settings.values())[best]
    out[method] = {"setting": sweep[best]["setting"], "validation": stats(rows, "validation"),
                   "test": stats(rows, "test"), "sweep": sweep}
  return out


def order_spread(summary: Mapping[str, dict]) -> dict[str, float] | None:
  """OPCM's test average over its task orders, at the chosen opcm_alpha: mean, std, min, max.

  The table's OPCM row is the order chosen on validation, like any setting;
  this is the spread a user who cannot choose the order should expect.
  None when OPCM was not run.
  """
  name = METHODS["opcm"][0]
  if name not in summary:
    return None
  alpha = summary[name]["setting"]["opcm_alpha"]
  tests = np.array([p["test"] for p in summary[name]["sweep"] if p["setting"]["opcm_alpha"] == alpha])
  return {"opcm_alpha": alpha, "orders": len(tests), "mean": float(tests.mean()), "std": float(tests.std()),
          "min": float(tests.min()), "max": float(tests.max())}


def format_summary(summary: Mapping[str, dict], columns: Sequence[str]) -> str:
  """The test table: one row per method at its chosen setting, mean ± std over seeds in percent."""
  settings = {m: ", ".join(f"{k}={v:g}" for k, v in s["setting"].items()) for m, s in summary.items()}
  width = max(len(m) for m in summary) + 2
  set_width = max(9, *(len(s) + 2 for s in settings.values()))
  cells = [*columns, "average", "joint"]
  lines = ["method".ljust(width) + "setting".ljust(set_width) + "".join(f"{c:>13s}" for c in cells)]
  for method, s in summary.items():
    values = [f"{100 * s['test'][c][0]:.1f}±{100 * s['test'][c][1]:.1f}" if c in s["test"] else "-"
              for c in cells]
    lines.append(method.ljust(width) + settings[method].ljust(set_width) + "".join(f"{v:>13s}" for v in values))
  return "\n".join(lines)


def sweep_curves(summary: Mapping[str, dict], methods: Sequence[str]
                 ) -> dict[str, tuple[str, np.ndarray, dict[str, np.ndarray]]]:
  """Each method's curves over its first parameter, the others at their chosen values."""
  curves = {}
  for method in methods:
    name, params = METHODS[method]
    if not params:
      continue
    first, *others = params
    chosen = summary[name]["setting"]
    points = [p for p in summary[name]["sweep"] if all(p["setting"][k] == chosen[k] for k in others)]
    title = name + "".join(f", {k}={chosen[k]:g}" for k in others)
    curves[title] = (first, np.array([p["setting"][first] for p in points]),
                     {split: np.array([p[split] for p in points]) for split in ("validation", "test")})
  return curves


def first_seed_chosen_row(runs: Sequence[dict], summary: Mapping[str, dict], config, method: str) -> dict | None:
  """The first seed's run of `method` (a METHODS id) at its chosen setting; None when it was not run."""
  name = METHODS[method][0]
  if name not in summary:
    return None
  first = config.task_vectors.seeds[0]
  return next(r for r in runs if r["method"] == name and r["seed"] == first
              and r["setting"] == summary[name]["setting"])


def plot_map_front(runs: Sequence[dict], summary: Mapping[str, dict], config, workdir: pathlib.Path
                   ) -> pathlib.Path | None:
  """`<workdir>/map_pareto_front.png`: the first seed's two-task MAP front (at the chosen MAP setting),
  and Bayesian MAP's from as many merges.

  None when MAP was not run or has fewer than two tasks.
  """
  row = first_seed_chosen_row(runs, summary, config, "map")
  if row is None or "map_front_2d" not in row:
    return None
  front = row["map_front_2d"]
  a, b = front["tasks"]
  return plots.pareto_front(
      np.array(front["sampled"]), np.array(front["predicted"]), np.array(front["actual"]),
      workdir / "map_pareto_front.png",
      f"MAP front: {a} vs {b} ({config.dataset}, seed {row['seed']})",
      (a, b), adaptive=(np.array(front["bayesian_sampled"]), np.array(front["bayesian_predicted"])))


def plot_adamerging_coefficients(runs: Sequence[dict], summary: Mapping[str, dict], config, workdir: pathlib.Path
                                 ) -> pathlib.Path | None:
  """`<workdir>/adamerging_coefficients.png`: the first seed's layer-wise AdaMerging coefficients
  (f32[tasks, leaves], leaves in tree order) at the chosen setting; None when it was not run."""
  row = first_seed_chosen_row(runs, summary, config, "adamerging_layer")
  if row is None:
    return None
  coefficients = np.asarray(row["coefficients"])
  return plots.curves(
      np.arange(coefficients.shape[1]), dict(zip(config.members, coefficients)),
      workdir / "adamerging_coefficients.png",
      f"AdaMerging (layer-wise) coefficients ({config.dataset}, seed {row['seed']})", "coefficient",
      xlabel="leaf (tree order)")


def run(config, workdir: str | pathlib.Path) -> dict[str, dict]:
  """The whole experiment; returns `summarise(runs)` (see the module docstring)."""
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  members, model = train.prepare(config)
  check_config(config, members)
  tv = config.task_vectors
  fit, validation = zip(*(hold_out(m.task, tv.validation_fraction, config.data_seed + i)
                          for i, m in enumerate(members)))
  smallest = min(len(t.x_train) for t in fit)
  if config.batch_size > smallest:
    raise ValueError(f"batch_size {config.batch_size} > {smallest}, the smallest task's fitting examples")
  pretraining = pretraining_task(config, fit)
  runs = []
  for seed in tv.seeds:
    runs += run_seed(config, model, members, fit, validation, pretraining, seed, workdir)
    logging.info("seed %d done at %.0f s", seed, time.perf_counter() - start)
  summary = summarise(runs)
  print(f"\n{config.model.name} on {config.dataset}: {len(members)} tasks, seeds {tuple(tv.seeds)};"
        " test accuracy (task-aware per task), settings chosen on validation")
  print(format_summary(summary, list(config.members)))
  spread = order_spread(summary)
  if spread:
    print(f"\nOPCM over {spread['orders']} task orders (opcm_alpha={spread['opcm_alpha']:g}, mean over seeds):"
          f" test average {100 * spread['mean']:.1f} ± {100 * spread['std']:.1f}"
          f" (min {100 * spread['min']:.1f}, max {100 * spread['max']:.1f})")
  (workdir / "task_vectors.json").write_text(json.dumps(
      {"runs": runs, "summary": summary, "opcm_order_spread": spread}, indent=1))
  bars = {m: s["test"]["average"] for m, s in summary.items() if not m.startswith("fine-tuned t")}
  references = {m: summary[m]["test"]["average"][0] for m in (BASE, METHODS["average"][0]) if m in summary}
  plot = plots.bars_and_sweeps(
      bars, sweep_curves(summary, swept_methods(config)), workdir / "task_vectors.png",
      f"{config.model.name} on {config.dataset}: {len(members)} tasks merged (test, settings by validation)",
      "average accuracy", references=references)
  for extra in (plot_map_front(runs, summary, config, workdir),
                plot_adamerging_coefficients(runs, summary, config, workdir)):
    if extra:
      print(f"wrote {extra}")
  print(f"\nwrote {plot} and {workdir / 'task_vectors.json'} ({time.perf_counter() - start:.0f} s)")
  return summary


if __name__ == "__main__":
  cli.main(run, about="Task vectors", config="experiments/configs/task_vectors_mlp_digits.py",
           workdir="workdir/task_vectors")
