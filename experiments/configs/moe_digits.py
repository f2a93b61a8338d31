r"""Expert merging on digits: a top-2 mixture of 8 MLP experts merged to 4 and to 2.

    python -m experiments.moe --config=experiments/configs/moe_digits.py --workdir=/tmp/moe

Three seeds of a `moe_mlp` (Dense 64 + ReLU, then `h + MoE(h)` with 8 experts
of 32 hidden units, top-2 routing, a Switch load-balancing loss), merged by
M-SMoE (the matching chosen on a validation slice held out of training),
M-SMoE without alignment, a uniform average of the same groups, and by
dropping the least used experts; MC-SMoE compresses the M-SMoE merge. A few
CPU minutes.
"""

import ml_collections

from experiments.configs import common


def get_config():
  # validation_fraction: the training examples held out of training, to choose the matching on.
  c = common.heldout_config(dataset="digits", validation_fraction=0.2)
  c.model = ml_collections.ConfigDict({"features": (64,), "num_experts": 8, "expert_features": 32, "top_k": 2})
  c.num_steps = 2000
  c.batch_size = 64
  c.learning_rate = 3e-3
  c.balance_loss = 0.01  # Switch Transformer's load-balancing loss, scaled
  c.merge_batch_size = 256  # the routing statistics' batches (training inputs, unlabelled)
  c.num_groups = (4, 2)
  c.matchings = ("weight", "activation")
  # MC-SMoE's compression of the M-SMoE merge: rank and density of each expert matrix.
  c.compress_rank = 8
  c.compress_density = 0.05
  return c
