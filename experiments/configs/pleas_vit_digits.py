r"""PLeaS on pairs of small ViTs trained on digits' label halves (0-4, 5-9).

    python -m experiments.pleas \
        --config=experiments/configs/pleas_vit_digits.py --workdir=/tmp/pleas_vit

    python -m experiments.pleas \
        --config=experiments/configs/pleas_vit_digits.py --workdir=/tmp/pleas_vit_separate \
        --config.pleas.heads=separate

Each seed pair trains model A on classes 0-4 and B on 5-9 (a shared 10-class
head, task-aware accuracy) from different initialisations: 2x2 patches of
the 8x8 images (16 tokens and a class token), 2 pre-LayerNorm blocks, a
64-unit stream, 4 heads of 16, MLPs of 128. With the first command the
merges merge the heads ("shared"); with `--config.pleas.heads=separate` each
model keeps its own task's head. About 40 minutes on a busy 2-core CPU (most
of it compiling each merge's layer solves; `JAX_COMPILATION_CACHE_DIR`
shares them between seeds and runs); `--config.pleas.probe=True` also
scores a fresh linear probe per task on the class token's features.
"""

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="digits", split="disjoint_labels", model="vit",
      model_config={"patch_size": 2, "embed_dim": 64, "depth": 2, "num_heads": 4, "head_dim": 16,
                    "mlp_dim": 128},
      num_steps=1000,
  )
  c.pleas = common.pleas_config(probe=False)
  return c
