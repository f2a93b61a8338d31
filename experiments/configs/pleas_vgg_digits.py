r"""PLeaS on pairs of small VGGs (BatchNorm) trained on digits' label halves (0-4, 5-9).

    python -m experiments.pleas \
        --config=experiments/configs/pleas_vgg_digits.py --workdir=/tmp/pleas_vgg

The convolutional counterpart of `pleas_mlp_digits.py`: each seed pair trains
model A on classes 0-4 and B on 5-9 from different initialisations; merges
reset their BatchNorm statistics on the training inputs (`build_fn`); every
model is also scored by a fresh linear probe per task.
"""

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="digits", split="disjoint_labels", model="vgg",
      model_config={"features": (32, 32, "M", 64, 64, "M"), "dense": (128,)}, num_steps=1000,
  )
  c.pleas = common.pleas_config()
  return c
