r"""PLeaS on pairs of small VGGs (BatchNorm) trained on digits' label halves (0-4, 5-9).

    python -m experiments.pleas \
        --config=experiments/configs/pleas_vgg_digits.py --workdir=/tmp/pleas_vgg

The convolutional counterpart of `pleas_mlp_digits.py`: each seed pair trains
model A on classes 0-4 and B on 5-9 from different initialisations; merges
reset their BatchNorm statistics on the training inputs (`build_fn`); every
model is also scored by a fresh linear probe per task.
"""

import ml_collections

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="digits", split="disjoint_labels", model="vgg",
      model_config={"features": (32, 32, "M", 64, 64, "M"), "dense": (128,)}, num_steps=1000,
  )
  c.pleas = ml_collections.ConfigDict({
      "budgets": (1.0, 1.2, 1.5, 1.8, 2.0),
      "seeds": (0, 1, 2),
      "methods": ("permute and average", "ZipIt!", "PLeaS (weight)", "PLeaS (activation)", "PLeaS-free"),
      "ridge": 1e-3,
      "probe": True,
      # "shared": the global 10-class heads are merged (task-aware accuracy);
      # "separate": each model keeps its own task's head (--config.pleas.heads=separate).
      "heads": "shared",
      "batch_size": 256,
      "free_transforms": (("blur", {"sigma": 2.0}), ("noise", {"std": 0.5})),
  })
  return c
