r"""PLeaS on pairs of MLPs trained on shifted domains of MNIST-1D (clean, blurred): one shared head.

    python -m experiments.pleas \
        --config=experiments/configs/pleas_mlp_mnist1d_domains.py --workdir=/tmp/pleas_domains

Both models classify all ten classes, A on clean and B on blurred signals,
from different initialisations; their outputs are merged (no task heads).
PLeaS-free reads heavily noised signals, a domain neither model saw.
"""

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="mnist1d", split="domains", model="mlp",
      model_config={"features": (256, 256)}, num_steps=3000,
      split_options={"transforms": ("identity", "blur")},
  )
  c.pleas = common.pleas_config(free_transforms=(("noise", {"std": 1.0}),))
  return c
