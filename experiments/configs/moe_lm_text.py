r"""Expert merging in a byte LM on the text corpus: 8 experts per block merged to 4 and to 2.

    python -m experiments.moe --config=experiments/configs/moe_lm_text.py --workdir=/tmp/moe_lm

Three seeds of a Llama-style byte LM (`style="llama"`: RoPE, RMSNorm, GQA;
2 blocks, a 64-unit stream, 4 heads of 16) whose MLPs are mixtures of 8 ReLU
experts of 64 hidden units with top-2 routing (`moe`), trained on both
domains of `stdlib_text` (code and prose, 64-byte windows) less a
validation slice, with a Switch load-balancing loss. Each block's experts
are merged by M-SMoE (the matching chosen on the validation slice's
perplexity), M-SMoE without alignment, a uniform average of the same
groups, and by dropping the least used experts; MC-SMoE compresses the
M-SMoE merge. Routing statistics read `merge_examples` training windows;
validation and test perplexity `eval_windows` windows each.
"""

import ml_collections

from experiments.configs import common


def get_config():
  # validation_fraction: the training windows held out of training, to choose the matching on.
  c = common.heldout_config(dataset="stdlib_text", validation_fraction=0.05, context=64)
  c.model = ml_collections.ConfigDict({
      "style": "llama", "embed_dim": 64, "depth": 2, "num_heads": 4, "head_dim": 16, "mlp_dim": 64,
      "max_len": 64, "moe": {"num_experts": 8, "top_k": 2}})
  c.num_steps = 1000
  c.batch_size = 32
  c.learning_rate = 3e-3
  c.balance_loss = 0.01  # Switch Transformer's load-balancing loss, scaled
  c.merge_examples = 512  # training windows the routing statistics read (unlabelled)
  c.merge_batch_size = 64
  c.eval_windows = 512  # validation and test windows scored (perplexity)
  c.num_groups = (4, 2)
  c.matchings = ("weight", "activation")
  # MC-SMoE's compression of the M-SMoE merge: rank and density of each expert matrix.
  c.compress_rank = 8
  c.compress_density = 0.05
  return c
