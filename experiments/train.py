r"""Trains one model per task of a split: the pairs that later get merged.

    python -m experiments.train \
        --config=experiments/configs/digits_mlp_pair.py --workdir=/tmp/pair

For task i of `config.split`, model `config.members[i]` is trained with seed
`config.seed + i` and written to `<workdir>/<member>/`:

    checkpoints/   orbax train-state checkpoints; a rerun resumes from the last
    model/         the final variables, with metadata (mergejax.io.load_metadata)
    metrics.json   loss curve and final per-task accuracy

A member whose `model/` exists is reused, not retrained. Every input (config
keys, dataset, split, model config, task count) is checked before any training.
"""

from collections.abc import Iterator
import dataclasses
import json
import pathlib
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from experiments import evaluate
from experiments import cli
from mergejax import data
from mergejax import io
from mergejax import models

@dataclasses.dataclass(frozen=True)
class Member:
  """One model of a pair: its name, task and seed."""

  name: str
  task: Any
  seed: int


def model_config(config) -> dict[str, Any]:
  """The zoo keyword arguments of `config.model`, as a plain dict."""
  return config.model.config.to_dict()


def prepare(config) -> tuple[list[Member], Any]:
  """Loads data and checks the whole config; raises ValueError before training.

  Returns:
    The members to train and the model (an untrained flax Module).
  """
  dataset = data.load(config.dataset, seed=config.data_seed)
  tasks = data.split(dataset, config.split.kind, seed=config.data_seed, **config.split.options.to_dict())
  if len(config.members) != len(tasks):
    raise ValueError(
        f"config.members names {len(config.members)} models but split"
        f" {config.split.kind!r} makes {len(tasks)} tasks"
    )
  if not 0 <= config.warmup_steps < config.num_steps:
    raise ValueError(f"warmup_steps {config.warmup_steps} not in [0, num_steps={config.num_steps})")
  smallest = min(len(t.x_train) for t in tasks)
  if not 1 <= config.batch_size <= smallest:
    raise ValueError(f"batch_size {config.batch_size} not in [1, {smallest}] (the smallest task)")
  cfg = model_config(config)
  if cfg.get("num_classes", dataset.num_classes) != dataset.num_classes:
    raise ValueError(
        f"model num_classes {cfg['num_classes']} != {dataset.num_classes} classes of"
        f" {config.dataset!r} (the head spans the global label space)"
    )
  model = models.build(config.model.name, **{**cfg, "num_classes": dataset.num_classes})
  members = [
      Member(name, task, config.seed + i)
      for i, (name, task) in enumerate(zip(config.members, tasks))
  ]
  return members, model


def init_variables(model, seed: int, x: np.ndarray):
  """`model.init` on one example batch, jitted."""
  return jax.jit(model.init)(jax.random.key(seed), jnp.asarray(x[:1]))


def make_optimizer(config) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, config.num_steps
  )
  return optax.adamw(schedule, weight_decay=config.weight_decay)


def make_train_step(model, optimizer):
  """One jitted SGD step on `state = {params, batch_stats?, opt_state, step}`."""

  def loss_fn(params, state, x, y):
    variables = {**{k: v for k, v in state.items() if k == "batch_stats"}, "params": params}
    if "batch_stats" in state:
      logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    else:
      logits, updates = model.apply(variables, x, train=True), {}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates

  @jax.jit
  def step(state, x, y):
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], state, x, y)
    deltas, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new = {**state, **updates, "params": optax.apply_updates(state["params"], deltas)}
    return {**new, "opt_state": opt_state, "step": state["step"] + 1}, loss

  return step


def train_batches(config, task, seed: int, start_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The member's deterministic stream of full batches, from `start_step` on."""
  stream = data.batches(
      task.x_train, task.y_train, batch_size=config.batch_size, seed=seed,
      epochs=None, drop_remainder=True,
  )
  for _ in range(start_step):
    next(stream)
  return stream


def checkpoint_manager(directory: pathlib.Path, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, save_interval_steps=config.checkpoint_every, create=True
      ),
  )


def train_member(
    config, model, member: Member, workdir: pathlib.Path, init: Any | None = None
) -> tuple[Any, dict]:
  """Trains (or resumes, or reuses) one member; returns (variables, metrics).

  Args:
    config: the training config (steps, batch size, optimizer).
    model: the flax Module.
    member: the member: its name (the directory under `workdir`), task and
      seed (of the initialisation and of the batch order).
    workdir: where the member's directory goes.
    init: variables to start from (fine-tuning a trained model); None: a
      fresh initialisation from the member's seed.
  """
  out = workdir / member.name
  if (out / "model").exists():
    logging.info("%s: reusing %s", member.name, out / "model")
    metrics = json.loads((out / "metrics.json").read_text())
    return io.restore(out / "model"), metrics

  variables = init_variables(model, member.seed, member.task.x_train) if init is None else init
  optimizer = make_optimizer(config)
  state = {**variables, "opt_state": optimizer.init(variables["params"]), "step": jnp.int32(0)}
  manager = checkpoint_manager(out / "checkpoints", config)
  losses = []
  if manager.latest_step() is not None:
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), losses=ocp.args.JsonRestore()
        ),
    )
    state, losses = restored["state"], list(restored["losses"])
    logging.info("%s: resumed at step %d", member.name, int(state["step"]))

  step_fn = make_train_step(model, optimizer)
  first = int(state["step"])
  stream = train_batches(config, member.task, member.seed, first)
  start = time.perf_counter()
  for step in range(first + 1, config.num_steps + 1):
    x, y = next(stream)
    state, loss = step_fn(state, x, y)
    if step % config.log_every == 0 or step == config.num_steps:
      losses.append([step, float(loss)])
      rate = (step - first) / (time.perf_counter() - start)
      logging.info(
          "%s: step %d/%d  loss %.4f  %.1f steps/s  eta %.0fs",
          member.name, step, config.num_steps, float(loss), rate,
          (config.num_steps - step) / rate,
      )
    if step % config.checkpoint_every == 0 or step == config.num_steps:
      # The last step is always saved: its optimizer state is the training's curvature
      # (`final_optimizer_state`). A copy of `losses`: the save is asynchronous and it keeps growing.
      manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), losses=ocp.args.JsonSave(list(losses))))
  manager.wait_until_finished()

  variables = {k: v for k, v in state.items() if k in ("params", "batch_stats")}
  logits_fn = evaluate.jit_logits(model.apply, variables)
  task = member.task
  metrics = {
      "member": member.name,
      "task": task.name,
      "seed": member.seed,
      "losses": losses,
      "test_accuracy": evaluate.task_accuracy(
          evaluate.logits_in_chunks(logits_fn, task.x_test), task.y_test, task.classes
      ),
  }
  io.save(out / "model", variables, metadata={
      "model": config.model.name,
      "model_config": model_config(config),
      "dataset": config.dataset,
      "split": config.split.to_dict(),
      "task": task.name,
      "classes": list(task.classes),
      "seed": member.seed,
      "num_steps": config.num_steps,
  }, overwrite=True)
  (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
  logging.info("%s: task-aware test accuracy on %s: %.4f", member.name, task.name, metrics["test_accuracy"])
  return variables, metrics


def final_optimizer_state(config, workdir: pathlib.Path, member_name: str, variables: Any) -> Any:
  """The optax state at the end of a member's training, read from its last checkpoint.

  Args:
    config: the config the member was trained with.
    workdir: the directory holding the member's directory.
    member_name: the member's name.
    variables: its final variables (the structure to restore into).

  Raises:
    ValueError: the member's last checkpoint is not its final step (a model
      trained before final steps were checkpointed: delete its directory).
  """
  manager = checkpoint_manager(workdir / member_name / "checkpoints", config)
  if manager.latest_step() != config.num_steps:
    raise ValueError(f"{workdir / member_name}: the last checkpoint is step {manager.latest_step()}, not the"
                     f" final step {config.num_steps}; delete the directory to train it again")
  like = {**variables, "opt_state": make_optimizer(config).init(variables["params"]), "step": jnp.int32(0)}
  restored = manager.restore(config.num_steps, args=ocp.args.Composite(state=ocp.args.StandardRestore(like)))
  return restored["state"]["opt_state"]


def train_pair(config, workdir: str | pathlib.Path) -> tuple[list[Member], Any, list, list[dict]]:
  """Checks everything, then trains every member; returns members, model, variables, metrics."""
  workdir = pathlib.Path(workdir)
  members, model = prepare(config)
  workdir.mkdir(parents=True, exist_ok=True)
  results = [train_member(config, model, m, workdir) for m in members]
  variables = [v for v, _ in results]
  metrics = [m for _, m in results]
  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
  return members, model, variables, metrics


if __name__ == "__main__":
  cli.main(train_pair, about="Training")
