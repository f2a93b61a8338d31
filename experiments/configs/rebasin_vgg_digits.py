r"""Git Re-Basin on a small VGG with BatchNorm trained twice on digits, two seeds.

    python -m experiments.rebasin \
        --config=experiments/configs/rebasin_vgg_digits.py --workdir=/tmp/rebasin_vgg
"""

import ml_collections

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="digits", split="replicas", model="vgg",
      model_config={"features": (32, 32, "M", 64, 64, "M"), "dense": (128,)}, num_steps=1000,
  )
  c.rebasin = ml_collections.ConfigDict({
      "methods": ("weight", "activation", "ste"),
      "batch_size": 250,
      "num_points": 11,
      "ste_steps": 200,
  })
  return c
