"""The fields every training config has, with their defaults.

Config files call `pair_config(...)` and override what differs; the config is
locked by `experiments.train`, so a misspelled key on the command line
(`--config.learnig_rate=...`) is an error, not a silent no-op.
"""

import ml_collections


def pair_config(
    *, dataset: str, split: str, model: str, model_config: dict, num_steps: int,
    split_options: dict | None = None,
) -> ml_collections.ConfigDict:
  """Trains one model per task of `split`, named `members`, seeds seed + i."""
  c = ml_collections.ConfigDict()
  c.dataset = dataset
  c.data_seed = 0
  c.split = ml_collections.ConfigDict({"kind": split, "options": split_options or {}})
  c.members = ("a", "b")
  c.seed = 0
  c.model = ml_collections.ConfigDict({"name": model, "config": model_config})
  c.num_steps = num_steps
  c.batch_size = 64
  c.learning_rate = 1e-3
  c.warmup_steps = 50
  c.weight_decay = 1e-4
  c.log_every = 100
  c.checkpoint_every = 250
  return c


def pleas_config(**overrides) -> ml_collections.ConfigDict:
  """`config.pleas` of `experiments.pleas`: every budget and method, 3 seed pairs.

  Fields: budgets, seeds, methods, ridge (relative), probe (also score a fresh
  linear probe per task, the paper's fine-grained protocol), heads ("shared":
  the global heads are merged, task-aware accuracy; "separate": each model
  keeps its own task's head), batch_size, free_transforms (the inputs
  PLeaS-free reads instead of the tasks': a domain the models never saw),
  heldout (the fraction of each model's training data PLeaS (select) holds
  out to choose its matching on) and candidates (the matchings it tries).
  """
  return ml_collections.ConfigDict({
      "budgets": (1.0, 1.2, 1.5, 1.8, 2.0),
      "seeds": (0, 1, 2),
      "methods": ("average", "permute and average", "ZipIt!", "PLeaS (weight)", "PLeaS (activation)",
                  "PLeaS (select)", "PLeaS-free"),
      "heldout": 0.2,
      "candidates": ("weight", "activation", "identity"),
      "ridge": 1e-3,
      "probe": True,
      "heads": "shared",
      "batch_size": 256,
      "free_transforms": (("blur", {"sigma": 2.0}), ("noise", {"std": 0.5})),
      **overrides,
  })


def heldout_config(*, dataset: str, validation_fraction: float = 0.2, seeds=(0, 1, 2),
                   **data_options) -> ml_collections.ConfigDict:
  """The data block of a per-seed experiment (`experiments.evaluate.run_seeds`).

  Fields: dataset, data_seed, data_options (the loader's keyword arguments),
  seeds, validation_fraction (the share of the training examples held out
  of training, to choose settings on).
  """
  c = ml_collections.ConfigDict()
  c.dataset = dataset
  c.data_seed = 0
  c.data_options = data_options
  c.seeds = tuple(seeds)
  c.validation_fraction = validation_fraction
  return c
