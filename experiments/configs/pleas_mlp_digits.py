r"""PLeaS on pairs of MLPs trained on digits' label halves (0-4, 5-9); ~10 CPU minutes.

    python -m experiments.pleas \
        --config=experiments/configs/pleas_mlp_digits.py --workdir=/tmp/pleas_mlp

Each seed pair trains model A on classes 0-4 and B on 5-9 (a shared 10-class
output space, task-aware accuracy), from different initialisations.
"""

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="digits", split="disjoint_labels", model="mlp",
      model_config={"features": (128, 128)}, num_steps=1000,
  )
  c.pleas = common.pleas_config()
  return c
