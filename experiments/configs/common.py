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
