"""HF GPT-2 (`transformers` `GPT2LMHeadModel`, `GPT2Model`) <-> the zoo's "lm", style "gpt2".

    state = safetensors.numpy.load_file("gpt2/model.safetensors")
    hf_config = json.loads(pathlib.Path("gpt2/config.json").read_text())
    kwargs = gpt2.CONVERTER.infer_config(state, hf_config)   # models.build("lm", **kwargs)
    variables = gpt2.CONVERTER.to_variables(state, kwargs)
    ...                                                      # merge, fine-tune
    safetensors.numpy.save_file(gpt2.CONVERTER.from_variables(merged, kwargs), "out/model.safetensors")
    # with the same config.json beside it: GPT2LMHeadModel.from_pretrained("out")

Every tensor loads as it is: GPT-2's Conv1D weights are stored [in, out],
as a Flax Dense kernel is (only an untied head, a torch Linear, is
transposed). i the layer, d = n_embd, P = n_positions, f = n_inner (4d):

  HF GPT2LMHeadModel                         ours (under params/)          shape     load
  transformer.wte.weight                     embed/embedding               [V, d]    as is
  transformer.wpe.weight                     pos_embed                     [P, d]    as is
  transformer.h.{i}.ln_1.weight, .bias       block{i}/ln_attn/scale, bias  [d]       as is
  transformer.h.{i}.attn.c_attn.weight       block{i}/attn_qkv/kernel      [d, 3d]   as is
  transformer.h.{i}.attn.c_attn.bias         block{i}/attn_qkv/bias        [3d]      as is
  transformer.h.{i}.attn.c_proj.weight       block{i}/attn_out/kernel      [d, d]    as is
  transformer.h.{i}.attn.c_proj.bias         block{i}/attn_out/bias        [d]       as is
  transformer.h.{i}.ln_2.weight, .bias       block{i}/ln_mlp/scale, bias   [d]       as is
  transformer.h.{i}.mlp.c_fc.weight          block{i}/mlp_up/kernel        [d, f]    as is
  transformer.h.{i}.mlp.c_fc.bias            block{i}/mlp_up/bias          [f]       as is
  transformer.h.{i}.mlp.c_proj.weight        block{i}/mlp_down/kernel      [f, d]    as is
  transformer.h.{i}.mlp.c_proj.bias          block{i}/mlp_down/bias        [d]       as is
  transformer.ln_f.weight, .bias             ln_final/scale, bias          [d]       as is
  lm_head.weight (tied: the wte tensor)      (tied: no leaf)               [V, d]    -
  lm_head.weight (tie_word_embeddings=False) lm_head/kernel                [V, d]    .T

The fused c_attn is q | k | v, each (heads, head_dim) head-major, as the
zoo's `attn_qkv` (GPT-2's `split(n_embd, dim=2)` and `_split_heads`).

Names read: GPT2LMHeadModel's, or GPT2Model's (no `transformer.` prefix, as
the hub's `gpt2` checkpoint); the causal-mask buffers `h.{i}.attn.bias` and
`h.{i}.attn.masked_bias` of older checkpoints are ignored. With a tied head
(`tie_word_embeddings`, GPT-2's default) a `lm_head.weight` is ignored (HF
ties it to wte on load) and none is written: the tied tensor is written once
(`safetensors.torch.save_file` refuses shared tensors). Names written:
GPT2LMHeadModel's.

HF config -> zoo kwargs (`infer_config`): shapes give vocab_size, max_len,
embed_dim, depth and mlp_dim (checked against `vocab_size`, `n_positions`,
`n_embd`, `n_layer`, `n_inner` where the config has them); the config gives
`n_head` (head_dim = n_embd / n_head), `layer_norm_epsilon` (norm_epsilon)
and `tie_word_embeddings`. `activation_function` must be the tanh GELU
(`gelu_new` or `gelu_pytorch_tanh`), `scale_attn_weights` true,
`scale_attn_by_inverse_layer_idx` and `add_cross_attention` false.
"""

from collections.abc import Mapping
import re
from typing import Any

from mergejax.io.convert import lm_table
from mergejax.models import lm
from mergejax.models import zoo

PREFIX = "transformer."
_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias$")
# Options of the zoo's LM that HF GPT-2 fixes.
_GPT2_OPTIONS = dict(positions="learned", norm="layer", mlp="gelu", fused_qkv=True, use_bias=True, moe=None)


def canonical_names(state: Mapping[str, Any]) -> Mapping[str, Any]:
  """`state` in GPT2LMHeadModel's names (a GPT2Model state dict gains `transformer.`)."""
  if f"{PREFIX}wte.weight" in state or "wte.weight" not in state:
    return state
  return lm_table.Renamed(state, lambda k: k if k.startswith("lm_head.") else PREFIX + k)


def infer_config(state: Mapping[str, Any], hf_config: Mapping[str, Any] | None) -> dict[str, Any]:
  """The zoo kwargs (`models.build("lm", **kwargs)`) of a GPT-2 state dict.

  Args:
    state: name -> array (only `.shape` is read).
    hf_config: HF's config (config.json as a dict, or `GPT2Config.to_dict()`).

  Raises:
    ValueError: without a config (the head count is not in the shapes), for
      an option the zoo model lacks, or a config that contradicts the shapes.
  """
  where = "gpt2"
  if hf_config is None:
    raise ValueError(f"{where}: the number of heads is not in the tensor shapes; pass HF's config "
                     "(config.json as a dict) with n_head")
  state = canonical_names(state)
  for name in (f"{PREFIX}wte.weight", f"{PREFIX}wpe.weight", f"{PREFIX}h.0.mlp.c_fc.weight"):
    if name not in state:
      raise ValueError(f"{where}: missing key {name!r}")
  vocab, d = tuple(state[f"{PREFIX}wte.weight"].shape)
  positions = state[f"{PREFIX}wpe.weight"].shape[0]
  mlp_dim = state[f"{PREFIX}h.0.mlp.c_fc.weight"].shape[1]
  depth = lm_table.layer_count(state, rf"{re.escape(PREFIX)}h\.(\d+)\.", where=where)

  def value(field, default, supported=None):
    return lm_table.config_value(hf_config, field, default, supported, where=f"{where} config")

  for field, from_shapes in (("vocab_size", vocab), ("n_positions", positions), ("n_embd", d),
                             ("n_layer", depth), ("n_inner", mlp_dim)):
    if hf_config.get(field) is not None and hf_config[field] != from_shapes:
      raise ValueError(f"{where} config: {field}={hf_config[field]} but the tensors say {from_shapes}")
  value("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"))
  value("scale_attn_weights", True, (True,))
  value("scale_attn_by_inverse_layer_idx", False, (False,))
  value("add_cross_attention", False, (False,))
  heads = value("n_head", None)
  if not isinstance(heads, int) or heads < 1 or d % heads:
    raise ValueError(f"{where} config: n_head={heads!r} must be a positive int dividing n_embd={d}")
  return dict(style="gpt2", vocab_size=vocab, max_len=positions, embed_dim=d, depth=depth,
              num_heads=heads, head_dim=d // heads, mlp_dim=mlp_dim,
              norm_epsilon=float(value("layer_norm_epsilon", 1e-5)),
              tie_embeddings=bool(value("tie_word_embeddings", True)))


def _config(kwargs: Mapping[str, Any]) -> lm.LMConfig:
  """The zoo config of `kwargs`, checked to be one HF GPT-2 can hold."""
  cfg = zoo.config("lm", **kwargs)
  for field, hf in _GPT2_OPTIONS.items():
    if getattr(cfg, field) != hf:
      raise ValueError(f"gpt2: HF GPT-2 has {field}={hf!r}; the zoo config has {getattr(cfg, field)!r}")
  if cfg.num_kv_heads != cfg.num_heads:
    raise ValueError(f"gpt2: HF GPT-2 has no grouped-query attention; num_kv_heads={cfg.num_kv_heads}")
  if len(set(cfg.num_heads)) > 1 or len(set(cfg.mlp_dim)) > 1:
    raise ValueError(f"gpt2: HF GPT-2 has one n_head and n_inner for all layers; the zoo config has "
                     f"num_heads={cfg.num_heads}, mlp_dim={cfg.mlp_dim}")
  if cfg.num_heads[0] * cfg.head_dim != cfg.embed_dim:
    raise ValueError(f"gpt2: HF GPT-2 needs num_heads * head_dim == embed_dim; the zoo config has "
                     f"{cfg.num_heads[0]} * {cfg.head_dim} != {cfg.embed_dim}")
  return cfg


def rows(cfg: lm.LMConfig) -> list[lm_table.Row]:
  """The table above for one configuration: HF name, our path, HF shape, transpose."""
  d, vocab = cfg.embed_dim, cfg.vocab_size

  def row(name, path, shape, transpose=False):
    return lm_table.Row(name, ("params", *path.split("/")), shape, transpose)

  out = [row(f"{PREFIX}wte.weight", "embed/embedding", (vocab, d)),
         row(f"{PREFIX}wpe.weight", "pos_embed", (cfg.max_len, d))]
  for i, f in enumerate(cfg.mlp_dim):
    hf, ours = f"{PREFIX}h.{i}.", f"block{i}/"
    for hf_name, our_name, width_in, width_out in (("attn.c_attn", "attn_qkv", d, 3 * d),
                                                   ("attn.c_proj", "attn_out", d, d),
                                                   ("mlp.c_fc", "mlp_up", d, f),
                                                   ("mlp.c_proj", "mlp_down", f, d)):
      out += [row(f"{hf}{hf_name}.weight", f"{ours}{our_name}/kernel", (width_in, width_out)),
              row(f"{hf}{hf_name}.bias", f"{ours}{our_name}/bias", (width_out,))]
    for hf_name, our_name in (("ln_1", "ln_attn"), ("ln_2", "ln_mlp")):
      out += [row(f"{hf}{hf_name}.weight", f"{ours}{our_name}/scale", (d,)),
              row(f"{hf}{hf_name}.bias", f"{ours}{our_name}/bias", (d,))]
  out += [row(f"{PREFIX}ln_f.weight", "ln_final/scale", (d,)),
          row(f"{PREFIX}ln_f.bias", "ln_final/bias", (d,))]
  if not cfg.tie_embeddings:
    out.append(row("lm_head.weight", "lm_head/kernel", (vocab, d), transpose=True))
  return out


CONVERTER = lm_table.lm_converter("gpt2", infer_config=infer_config, config=_config, rows=rows,
                                   canonical_names=canonical_names, buffer=_BUFFER)
