r"""PLeaS on pairs of small VGGs (BatchNorm) trained on shifted domains of digits: one shared head.

    python -m experiments.pleas \
        --config=experiments/configs/pleas_vgg_digits_domains.py --workdir=/tmp/pleas_vgg_domains

Both models classify all ten digits from different initialisations, A on
half of the training images as they are and B on the other half translated
by two pixels (zero-filled); their outputs are merged (no task heads), and
each task is scored on its own domain of the test set. PLeaS-free reads
blurred and noised images, a domain neither model saw.
"""

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="digits", split="domains", model="vgg",
      model_config={"features": (32, 32, "M", 64, 64, "M"), "dense": (128,)}, num_steps=1000,
      split_options={"transforms": ("identity", ("shift", {"pixels": 2}))},
  )
  c.pleas = common.pleas_config()
  return c
