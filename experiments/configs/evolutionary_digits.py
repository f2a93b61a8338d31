r"""Evolutionary merging (M2N2) on digits: 6 MLPs trained on overlapping label subsets.

    python -m experiments.evolutionary \
        --config=experiments/configs/evolutionary_digits.py --workdir=/tmp/evolutionary

Per seed, 6 MLPs (Dense 64 + ReLU) from one initialisation, model i trained
on 4 of the 10 classes (from class 10 i // 6 on, cyclically), evolved for
`generations` children on a validation slice held out of training. A few
CPU minutes.
"""

from experiments.configs import common


def get_config():
  # validation_fraction: the training examples held out of training, evolution's fitness data.
  c = common.heldout_config(dataset="digits", validation_fraction=0.2)
  c.features = (64,)
  c.num_models = 6
  c.classes_per_model = 4
  c.num_steps = 600
  c.batch_size = 32
  c.learning_rate = 3e-3
  c.generations = 300
  c.archive_size = 6
  c.alpha = 1.0  # resource competition's strength
  c.mates = ("attraction", "random")  # the paper's mate choice, and the ablation
  return c
