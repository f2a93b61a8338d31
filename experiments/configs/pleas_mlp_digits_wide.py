r"""PLeaS on pairs of wide MLPs (512x512) trained on digits' label halves, one shared head.

    python -m experiments.pleas \
        --config=experiments/configs/pleas_mlp_digits_wide.py --workdir=/tmp/pleas_mlp_wide

`pleas_mlp_digits.py` at four times the width: each seed pair trains model A
on classes 0-4 and B on 5-9 from different initialisations, both with a
10-class head over the shared output space (task-aware and joint accuracy).
At this width the plain average of the unaligned weights is a stronger
baseline (it keeps more of each model), the setting where PLeaS must choose
the permutation it builds on rather than inherit weight matching's.
"""

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="digits", split="disjoint_labels", model="mlp",
      model_config={"features": (512, 512)}, num_steps=1000,
  )
  c.pleas = common.pleas_config(budgets=(1.0, 1.5, 1.8), probe=False)
  return c
