r"""Task vectors on digits: an MLP fine-tuned into 5 two-class tasks, merged back.

    python -m experiments.task_vectors \
        --config=experiments/configs/task_vectors_mlp_digits.py --workdir=/tmp/task_vectors

The base model learns all 10 classes from blurred and noised digits; each
task model is the base fine-tuned on two classes (0-1, 2-3, ..., 8-9) of the
digits themselves, keeping the 10-class head, and is scored task-aware. Each
method's settings are swept and chosen on a validation slice held out of the
training data. Three seeds, a few CPU minutes.
"""

import ml_collections

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="digits", split="disjoint_labels", model="mlp",
      model_config={"features": (128, 128)}, num_steps=1000,
      split_options={"classes": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))},
  )
  c.members = ("t01", "t23", "t45", "t67", "t89")
  c.task_vectors = ml_collections.ConfigDict({
      "seeds": (0, 1, 2),
      # The fraction of each task's training examples held out of all training, to choose settings on.
      "validation_fraction": 0.2,
      # The base learns every class from blurred and noised digits (a pre-training domain next to
      # the tasks'); on the tasks' own inputs it scores about 99-100% task-aware on every two-class
      # task already, and fine-tuning has nothing to add.
      "base_transforms": (("blur", {"sigma": 1.0}), ("noise", {"std": 0.5})),
      # Fine-tuning of the base into each task model; the multi-task model gets their steps together.
      "finetune": {"num_steps": 200, "learning_rate": 3e-4, "warmup_steps": 20},
      # Inputs per batch of the statistics passes (Fisher, RegMean's Grams).
      "batch_size": 256,
      # Method -> {parameter: values}; every point of the grid is merged and scored.
      "sweeps": {
          "average": {},
          "greedy_soup": {},
          "task_arithmetic": {"scale": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)},
          "ties": {"density": (0.1, 0.2, 0.5, 1.0), "scale": (0.5, 1.0, 1.5, 2.0)},
          "dare": {"drop": (0.1, 0.5, 0.9), "scale": (0.2, 0.4, 0.6, 0.8, 1.0)},
          "dare_ties": {"drop": (0.1, 0.5, 0.9), "density": (0.2, 0.5, 1.0), "scale": (0.5, 1.0, 1.5, 2.0)},
          "fisher": {"epsilon": (1e-8, 1e-6, 1e-4)},
          "regmean": {"alpha": (0.0, 0.5, 0.9, 1.0)},
          "regmean_plus_plus": {"alpha": (0.0, 0.5, 0.9, 1.0)},
          "lines": {"beta": (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)},
          "consensus_task_arithmetic": {"k": (1, 2), "scale": (0.2, 0.4, 0.6, 0.8, 1.0)},
          "consensus_ties": {"k": (1, 2), "density": (0.2, 0.5), "scale": (0.5, 1.0, 1.5)},
          "tall_masks": {"lambda_t": (0.2, 0.3, 0.4, 0.5, 0.6)},
          "sce": {"density": (0.1, 0.5, 1.0), "scale": (0.5, 1.0, 1.5, 2.0)},
          "doge": {"density": (0.3, 1.0), "scale": (0.03, 0.1, 0.3, 1.0)},
          "pcb": {"density": (0.05, 0.1, 0.2), "scale": (0.8, 1.0, 1.2, 1.5)},
          "widen": {"above_average_ratio": (0.5, 1.0, 1.5, 2.0), "calibrated_score": (0.2, 0.5, 1.0)},
          "metric_weighted": {"penalty": (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)},
          "ota": {"power": (0.25, 0.5, 1.0, 2.0)},
          "opcm": {"opcm_alpha": (0.0, 0.3, 0.5, 0.7, 0.9), "order": (0, 1, 2, 3, 4)},
          "lora_arithmetic": {"rank": (4, 16), "scale": (0.2, 0.4, 0.6, 1.0)},
          "lora_lego": {"rank": (16,), "merged_rank": (16, 32), "scale": (0.5, 1.0, 2.0)},
          "reversible_lora": {"rank": (16,), "num_basis": (2, 3, 5)},
          # FW-Hard here; FW-Soft (every task model picked each step, the weights learned by fw_ada_steps
          # Adam steps at fw_ada_lr on the same labelled loss) is its own row.
          "fw_merging": {"fw_steps": (5, 10, 20), "fw_soft": (0,), "fw_line_search": (0, 1)},
          "fw_merging_soft": {"fw_steps": (1, 5), "fw_ada_lr": (0.01, 0.03), "fw_ada_steps": (100, 300)},
          "map": {"map_samples": (30, 60), "map_divisions": (4,)},
          # Bayesian MAP: MAP's budget, a quadratic's 21 terms then map_rounds adaptive rounds; nested MAP:
          # map_samples merges per pair of its 4 pairwise fronts (5 + 4 (map_samples + 1) in all).
          "map_bayesian": {"map_samples": (30, 60), "map_rounds": (1, 3), "map_divisions": (4,)},
          "map_nested": {"map_samples": (6, 12), "map_divisions": (10,)},
          # Entropy minimisation on each task's fitting inputs (unlabelled), over its own classes; the
          # layer-wise coefficients are one per leaf. Concrete AdaMerging: ada_steps steps for the mask,
          # then as many for the coefficients.
          "adamerging_task": {"ada_lr": (0.003, 0.01, 0.03), "ada_steps": (100, 300)},
          "adamerging_layer": {"ada_lr": (0.003, 0.01, 0.03), "ada_steps": (100, 300)},
          "concrete_task_arithmetic": {"mask_lr": (0.01, 0.1), "mask_steps": (100, 300), "scale": (0.3, 0.6)},
          "concrete_adamerging": {"ada_lr": (0.01, 0.03), "ada_steps": (100, 300), "mask_lr": (0.01, 0.1)},
          # Twin-merging: task arithmetic at `scale` shared, each task's rest kept at rank twin_rank, routed
          # per input. Expert Merging: em_steps Adam steps per stage; em_chunks > 0 is Expert Merging++.
          "twin_merging": {"twin_rank": (2, 8), "scale": (0.3, 0.6)},
          "expert_merging": {"em_lr": (0.01, 0.03), "em_steps": (100, 300), "em_chunks": (0, 8)},
      },
  })
  return c
