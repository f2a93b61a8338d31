r"""PLeaS on pairs of MLPs trained on digits' label halves (0-4, 5-9); ~10 CPU minutes.

    python -m experiments.pleas \
        --config=experiments/configs/pleas_mlp_digits.py --workdir=/tmp/pleas_mlp

Each seed pair trains model A on classes 0-4 and B on 5-9 (a shared 10-class
output space, task-aware accuracy), from different initialisations.
"""

import ml_collections

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="digits", split="disjoint_labels", model="mlp",
      model_config={"features": (128, 128)}, num_steps=1000,
  )
  c.pleas = ml_collections.ConfigDict({
      "budgets": (1.0, 1.2, 1.5, 1.8, 2.0),
      "seeds": (0, 1, 2),
      "methods": ("permute and average", "ZipIt!", "PLeaS (weight)", "PLeaS (activation)", "PLeaS-free"),
      "ridge": 1e-3,
      # Also score a fresh linear probe per task on the merged features (the paper's fine-grained protocol).
      "probe": True,
      # "shared": the global 10-class heads are merged (task-aware accuracy);
      # "separate": each model keeps its own task's head (--config.pleas.heads=separate).
      "heads": "shared",
      "batch_size": 256,
      # PLeaS-free reads these instead of the tasks' images: digits blurred and noised beyond
      # recognition, an unlabelled domain the models never saw.
      "free_transforms": (("blur", {"sigma": 2.0}), ("noise", {"std": 0.5})),
  })
  return c
