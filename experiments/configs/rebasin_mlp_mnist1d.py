r"""Git Re-Basin on a wide MLP (3 x 512) trained twice on MNIST-1D, two seeds.

    python -m experiments.rebasin \
        --config=experiments/configs/rebasin_mlp_mnist1d.py --workdir=/tmp/rebasin_mlp
"""

import ml_collections

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="mnist1d", split="replicas", model="mlp",
      model_config={"features": (512, 512, 512)}, num_steps=3000,
  )
  c.batch_size = 128
  c.rebasin = ml_collections.ConfigDict({
      "methods": ("weight", "activation", "ste"),
      "batch_size": 500,
      "num_points": 11,
      "ste_steps": 300,
  })
  return c
