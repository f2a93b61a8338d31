r"""OT fusion of digits MLPs: pairs of one width (two seeds) and a wider model into a narrower one.

    python -m experiments.ot_fusion \
        --config=experiments/configs/ot_fusion_mlp_digits.py --workdir=/tmp/ot_fusion

Per seed: A and B are MLPs (64, 64) from two seeds, W an MLP (96, 96) from a
third, all trained on digits' training set less a 20% validation slice. B is
fused into A (same width) and W into A (A's width) by exact OT on the weight
and the activation cost, and on the activation cost at the epsilon (exact or
Sinkhorn) that scores best on the validation slice; the same-width pair is
also averaged plainly and after weight matching. Three seeds, a few CPU
minutes.
"""

import ml_collections

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="digits", split="replicas", model="mlp",
      model_config={"features": (64, 64)}, num_steps=800,
  )
  c.ot_fusion = ml_collections.ConfigDict({
      "seeds": (0, 1, 2),
      "wide_features": (96, 96),
      # Training inputs the activation cost reads (never test inputs).
      "batch_size": 256,
      # The share of the training set held out of training, to choose epsilon on (never test).
      "validation_fraction": 0.2,
      # Sinkhorn's regularisation, relative to the mean cost, chosen on validation per seed and pair
      # (0: exact OT).
      "epsilons": (0.0, 0.02, 0.05, 0.1, 0.2),
  })
  return c
