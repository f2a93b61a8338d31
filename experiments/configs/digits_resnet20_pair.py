r"""Two ResNet-20s (width x2) on the two halves of digits' labels; a few CPU minutes.

    python -m experiments.train \
        --config=experiments/configs/digits_resnet20_pair.py --workdir=/tmp/digits_resnet20
"""

from experiments.configs import common


def get_config():
  return common.pair_config(
      dataset="digits", split="disjoint_labels", model="resnet20",
      model_config={"width_multiplier": 2}, num_steps=500,
  )
