r"""PLeaS on pairs of small Llama-style byte LMs, one trained on code, one on prose.

    python -m experiments.pleas \
        --config=experiments/configs/pleas_lm_text.py --workdir=/tmp/pleas_lm

Each seed pair trains model A on the code and B on the prose of the
`stdlib_text` corpus (64-byte windows) from different initialisations: 2
pre-norm blocks, a 64-unit stream, 4 heads of 16 (2 kv heads, GQA), RoPE,
RMSNorm, SwiGLU, a separate output head (`style="llama"`); 500 steps of 32
windows, about two minutes a model, and about an hour in all on a busy
2-core CPU (mostly compiling each merge's layer solves;
`JAX_COMPILATION_CACHE_DIR` shares them between seeds and runs). Every model
is scored by its perplexity on each domain's test windows (512 of each);
the merges read 512 train windows of each domain, PLeaS-free the same
windows reversed.
"""

from experiments.configs import common


def get_config():
  c = common.pair_config(
      dataset="stdlib_text", split="text_domains", model="lm",
      model_config={"style": "llama", "embed_dim": 64, "depth": 2, "num_heads": 4, "head_dim": 16,
                    "max_len": 64},
      num_steps=500,
  )
  c.data_options = {"context": 64}
  c.members = ("code", "prose")
  c.batch_size = 32
  c.learning_rate = 3e-3
  c.pleas = common.pleas_config(
      probe=False, batch_size=64, free_transforms=(), free_text="reversed", merge_windows=512, eval_windows=512)
  return c
