r"""Two MLPs on the two halves of digits' labels (0-4, 5-9); about 30 s on CPU.

    python -m experiments.train \
        --config=experiments/configs/digits_mlp_pair.py --workdir=/tmp/digits_mlp

Both heads span all 10 classes (a shared output space); each model sees only
its half of the labels, and per-task accuracy is task-aware.
"""

from experiments.configs import common


def get_config():
  return common.pair_config(
      dataset="digits", split="disjoint_labels", model="mlp",
      model_config={"features": (128, 128)}, num_steps=1000,
  )
