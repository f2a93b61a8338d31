r"""DIMAT on digits: 4 MLP agents on a ring, each with its own classes plus a little shared data.

    python -m experiments.dimat \
        --config=experiments/configs/dimat_digits.py --workdir=/tmp/dimat

Per seed: agent i of 4 trains on the digits of classes group i
(np.array_split of 0..9: 0-2, 3-5, 6-7, 8-9) plus a slice of the training set
shared by all (`shared_fraction`); each starts from its own initialisation
(one shared with `same_init`).
After `pretrain_rounds` x `steps_per_round` steps alone, `rounds` rounds of
merge (ring, 1/3 each) then `steps_per_round` local steps. Settings are
fixed, not tuned. A few CPU minutes.
"""

import ml_collections


def get_config():
  return ml_collections.ConfigDict({
      "dataset": "digits",
      "data_seed": 0,
      "seeds": (0, 1, 2),
      "agents": 4,
      "graph": "ring",  # "ring" | "complete"
      "shared_fraction": 0.05,  # of the training set, given to every agent
      "features": (64, 64),
      "same_init": False,  # True: every agent starts from one initialisation
      "learning_rate": 1e-3,
      "batch_size": 64,
      "pretrain_rounds": 6,  # of steps_per_round steps each, alone
      "rounds": 6,
      "steps_per_round": 50,
      # Each agent's own training inputs that activation matching reads (never test inputs).
      "align_batches": 2,
      "align_batch_size": 128,
  })
