r"""Two MLPs on MNIST-1D, one on clean and one on blurred inputs (a shared head).

    python -m experiments.train \
        --config=experiments/configs/mnist1d_mlp_domains.py --workdir=/tmp/mnist1d_domains

The pair for merging across shifted domains; about a minute on CPU.
"""

from experiments.configs import common


def get_config():
  return common.pair_config(
      dataset="mnist1d", split="domains", model="mlp",
      model_config={"features": (256, 256)}, num_steps=3000,
      split_options={"transforms": ("identity", "blur")},
  )
