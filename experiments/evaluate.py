"""Accuracy of models, ensembles and merges, per task of a split; perplexity of language models.

A task is scored *task-aware*: the prediction is the argmax over the task's own
classes, as in the model-merging literature's per-task accuracy for models
whose head spans every class. `joint` accuracy is the argmax over all classes.
Inputs are scored in fixed-size chunks; the last chunk is padded and masked, so
every test set compiles once.
"""

from collections.abc import Callable, Sequence
import functools
import pathlib
import time
from typing import Any

from absl import logging
import jax
import numpy as np

import mergejax as mj

LogitsFn = Callable[[jax.Array], jax.Array]


def logits_in_chunks(logits_fn: LogitsFn, x: np.ndarray, chunk: int = 512) -> np.ndarray:
  """`logits_fn` over x: f32[n, ...] in padded chunks; returns f32[n, classes]."""
  n = len(x)
  size = min(chunk, n)
  out = []
  for start in range(0, n, size):
    part = x[start:start + size]
    pad = size - len(part)
    if pad:
      part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
    out.append(np.asarray(logits_fn(part))[: size - pad])
  return np.concatenate(out)


def task_accuracy(logits: np.ndarray, y: np.ndarray, classes: Sequence[int] | None) -> float:
  """Accuracy of logits: f32[n, C] against global labels y: int[n].

  With `classes`, only those logit columns compete (task-aware accuracy).
  """
  if classes is None:
    return float(np.mean(np.argmax(logits, -1) == y))
  classes = np.asarray(classes)
  pred = classes[np.argmax(logits[:, classes], -1)]
  return float(np.mean(pred == y))


def probe_accuracy(features_fn: LogitsFn, tasks, ridge: float = 1e-3) -> dict[str, float]:
  """Task-aware accuracy of a fresh linear probe per task on fixed features.

  The probe is a ridge classifier fitted in closed form to the task's
  training set (one-hot targets over the task's classes, a bias column,
  relative ridge `ridge * tr(F^T F) / d`), scored on its test set, as the
  PLeaS paper scores merges whose heads it replaces.

  Args:
    features_fn: x -> f32[n, ...], the features the probe reads (flattened).
    tasks: the split's tasks.
    ridge: relative ridge.

  Returns:
    `{task.name: accuracy}`.
  """
  out = {}
  for task in tasks:
    classes = np.asarray(task.classes)
    feats = [np.asarray(logits_in_chunks(features_fn, x), np.float64).reshape(len(x), -1)
             for x in (task.x_train, task.x_test)]
    f_train, f_test = (np.concatenate([f, np.ones((len(f), 1))], 1) for f in feats)
    targets = (task.y_train[:, None] == classes[None, :]).astype(np.float64)
    gram = f_train.T @ f_train
    lam = ridge * np.trace(gram) / len(gram)
    w = np.linalg.solve(gram + lam * np.eye(len(gram)), f_train.T @ targets)
    out[task.name] = float(np.mean(classes[np.argmax(f_test @ w, -1)] == task.y_test))
  return out


def ensemble_logits(logits: Sequence[np.ndarray]) -> np.ndarray:
  """Log of the mean of the members' softmax probabilities."""
  probs = np.mean([jax.nn.softmax(z, -1) for z in logits], axis=0)
  return np.log(np.maximum(probs, 1e-30))


def jit_logits(apply_fn: Callable, variables) -> LogitsFn:
  """`x -> apply_fn(variables, x)` compiled once per input shape (eval mode)."""
  return jax.jit(functools.partial(apply_fn, variables))


def score_model(logits_fn: LogitsFn, tasks) -> dict[str, float]:
  """Per-task accuracy of one model (or ensemble, or merge) and joint accuracy.

  Args:
    logits_fn: x -> f32[n, num_classes], over the global label space.
    tasks: the split's tasks (`mergejax.data.Task`), each with its test set
      and classes.

  Returns:
    `{task.name: task-aware accuracy, ..., "joint": accuracy over the tasks'
    test sets together, with every class competing}`.
  """
  out = {}
  all_logits, all_labels = [], []
  for task in tasks:
    logits = logits_in_chunks(logits_fn, task.x_test)
    out[task.name] = task_accuracy(logits, task.y_test, task.classes)
    all_logits.append(logits)
    all_labels.append(task.y_test)
  out["joint"] = task_accuracy(np.concatenate(all_logits), np.concatenate(all_labels), None)
  return out


def format_table(rows: dict[str, dict[str, float]]) -> str:
  """A text table: one row per method, one column per score, in percent."""
  columns = list(next(iter(rows.values())))
  width = max(len(name) for name in rows) + 2
  sizes = [max(9, len(c) + 2) for c in columns]
  lines = ["method".ljust(width) + "".join(f"{c:>{n}}" for c, n in zip(columns, sizes))]
  for name, row in rows.items():
    lines.append(
        name.ljust(width)
        + "".join(f"{100 * row[c]:>{n - 1}.1f}%" for c, n in zip(columns, sizes))
    )
  return "\n".join(lines)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Per-token cross-entropy in nats: logits f32[..., V], targets int[...] -> f64[...]."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  log_norm = np.log(np.exp(z).sum(-1))
  return log_norm - np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0]


def perplexity(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, chunk: int = 64) -> dict[str, float]:
  """Perplexity and bits per byte of a byte-level language model.

  Args:
    logits_fn: ids i32[n, t] -> logits f32[n, t, V].
    x: i32[n, t], the inputs (e.g. `TextDataset.x_test`).
    y: i32[n, t], the next tokens.
    chunk: windows per call (the last chunk is padded, so one compilation).

  Returns:
    `{"nll": mean per-token cross-entropy in nats, "perplexity": exp(nll),
    "bits_per_byte": nll / ln 2}` (a token is a byte).
  """
  x, y = np.asarray(x), np.asarray(y)
  if x.shape != y.shape or x.ndim != 2 or not len(x):
    raise ValueError(f"perplexity: x {x.shape} and y {y.shape} must be the same [n, t], n >= 1")
  size = min(chunk, len(x))
  total = 0.0
  for start in range(0, len(x), size):
    part = x[start:start + size]
    pad = size - len(part)
    if pad:
      part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
    logits = np.asarray(logits_fn(part))[: size - pad]
    total += token_nll(logits, y[start:start + size]).sum()
  nll = total / y.size
  return {"nll": float(nll), "perplexity": float(np.exp(nll)), "bits_per_byte": float(nll / np.log(2))}


def mean_std(values: Sequence[float]) -> dict[str, float]:
  """{"mean", "std"} of per-seed values (population std, as the experiments' tables print)."""
  return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def heldout_split(config) -> tuple[Any, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """`(dataset, (x, y) train, (x, y) validation)`: a validation slice held out of the training examples.

  Reads `config.dataset`, `config.data_seed`, `config.data_options` (the
  loader's options) and `config.validation_fraction` (the share of the
  training examples, drawn with `data_seed`, in the validation slice), the
  fields of `configs.common.heldout_config`.
  """
  ds = mj.data.load(config.dataset, seed=config.data_seed, **config.data_options.to_dict())
  order = np.random.default_rng(config.data_seed).permutation(len(ds.x_train))
  n_val = int(round(config.validation_fraction * len(order)))
  val, train = order[:n_val], order[n_val:]
  return ds, (ds.x_train[train], ds.y_train[train]), (ds.x_train[val], ds.y_train[val])


def run_seeds(config, workdir, run_seed: Callable[..., dict]) -> tuple[pathlib.Path, Any, dict[str, dict], float]:
  """The preamble of a per-seed experiment: makes `workdir`, splits the data, runs every seed.

  Args:
    config: a `configs.common.heldout_config` (with `seeds`).
    workdir: the output directory (created).
    run_seed: `(config, dataset, train_xy, val_xy, seed) -> dict`, one seed's results.

  Returns:
    `(workdir as a Path, dataset, {str(seed): run_seed's dict}, the start time (perf_counter))`.
  """
  start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ds, train_xy, val_xy = heldout_split(config)
  per_seed = {}
  for seed in config.seeds:
    per_seed[str(seed)] = run_seed(config, ds, train_xy, val_xy, seed)
    logging.info("seed %d done, %.0f s", seed, time.perf_counter() - start)
  return workdir, ds, per_seed, start
