"""HF Llama (`transformers` `LlamaForCausalLM`, `LlamaModel`) <-> the zoo's "lm", style "llama".

    state = safetensors.numpy.load_file("llama/model.safetensors")
    hf_config = json.loads(pathlib.Path("llama/config.json").read_text())
    kwargs = llama.CONVERTER.infer_config(state, hf_config)   # models.build("lm", **kwargs)
    variables = llama.CONVERTER.to_variables(state, kwargs)
    ...
    safetensors.numpy.save_file(llama.CONVERTER.from_variables(merged, kwargs), "out/model.safetensors")
    # with the same config.json beside it: LlamaForCausalLM.from_pretrained("out")

A torch Linear's weight is [out, in] and a Flax Dense kernel [in, out]:
every projection loads transposed (`.T`); the embedding and the RMSNorm
scales load as they are. i the layer, d = hidden_size, H heads, KV kv heads,
hd = head_dim, f = intermediate_size:

  HF LlamaForCausalLM                               ours (under params/)      HF shape    load
  model.embed_tokens.weight                         embed/embedding           [V, d]      as is
  model.layers.{i}.input_layernorm.weight           block{i}/ln_attn/scale    [d]         as is
  model.layers.{i}.self_attn.q_proj.weight          block{i}/attn_query/kernel [H hd, d]  .T
  model.layers.{i}.self_attn.k_proj.weight          block{i}/attn_key/kernel  [KV hd, d]  .T
  model.layers.{i}.self_attn.v_proj.weight          block{i}/attn_value/kernel [KV hd, d] .T
  model.layers.{i}.self_attn.o_proj.weight          block{i}/attn_out/kernel  [d, H hd]   .T
  model.layers.{i}.post_attention_layernorm.weight  block{i}/ln_mlp/scale     [d]         as is
  model.layers.{i}.mlp.gate_proj.weight             block{i}/mlp_gate/kernel  [f, d]      .T
  model.layers.{i}.mlp.up_proj.weight               block{i}/mlp_up/kernel    [f, d]      .T
  model.layers.{i}.mlp.down_proj.weight             block{i}/mlp_down/kernel  [d, f]      .T
  model.norm.weight                                 ln_final/scale            [d]         as is
  lm_head.weight (tie_word_embeddings=False)        lm_head/kernel            [V, d]      .T
  lm_head.weight (tied: the embed_tokens tensor)    (tied: no leaf)           [V, d]      -

With `attention_bias` and `mlp_bias` (both or neither: the zoo's `use_bias`
is one flag) every `*_proj.bias` loads as it is into `.../bias`. The q/k/v
head axis is (heads, head_dim) head-major (HF's `view(b, t, H, hd)`); query
head h reads kv head h // (H / KV) (HF's `repeat_kv`), as the zoo's GQA.

Names read: LlamaForCausalLM's, or LlamaModel's (no `model.` prefix; then an
untied head is missing); the RoPE buffers `rotary_emb.inv_freq` (per layer
in older checkpoints) are ignored. A tied head's `lm_head.weight` is ignored
when present and not written (HF ties it on load). Names written:
LlamaForCausalLM's.

HF config -> zoo kwargs (`infer_config`): shapes give vocab_size,
embed_dim, depth and mlp_dim (checked against `vocab_size`, `hidden_size`,
`num_hidden_layers`, `intermediate_size`); the config gives
`num_attention_heads`, `num_key_value_heads` (default: the heads),
`head_dim` (default hidden_size / heads; checked against q/k_proj's rows),
`rms_norm_eps` (norm_epsilon), the RoPE base (`rope_parameters["rope_theta"]`
in transformers 5, top-level `rope_theta` before; rope_base),
`max_position_embeddings` (max_len, unused by RoPE), `tie_word_embeddings`
and the biases. `hidden_act` must be `silu` and the RoPE type `default` (no
scaling: the zoo has none).
"""

from collections.abc import Mapping
import re
from typing import Any

from mergejax.io.convert import lm_table
from mergejax.models import lm
from mergejax.models import zoo

PREFIX = "model."
_BUFFER = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.(original_)?inv_freq$")
# Options of the zoo's LM that HF Llama fixes.
_LLAMA_OPTIONS = dict(positions="rope", norm="rms", mlp="swiglu", fused_qkv=False, moe=None)


def canonical_names(state: Mapping[str, Any]) -> Mapping[str, Any]:
  """`state` in LlamaForCausalLM's names (a LlamaModel state dict gains `model.`)."""
  if f"{PREFIX}embed_tokens.weight" in state or "embed_tokens.weight" not in state:
    return state
  return lm_table.Renamed(state, lambda k: k if k.startswith("lm_head.") else PREFIX + k)


def _rope(hf_config: Mapping[str, Any], where: str) -> float:
  """The RoPE base of a transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`) config."""
  parameters = dict(hf_config.get("rope_scaling") or {})
  parameters.update(hf_config.get("rope_parameters") or {})
  kind = parameters.get("rope_type", parameters.get("type", "default"))
  if kind != "default":
    raise ValueError(f"{where}: RoPE type {kind!r} is not supported; the zoo model has 'default' (no scaling)")
  theta = parameters.get("rope_theta", hf_config.get("rope_theta"))
  return float(10000.0 if theta is None else theta)


def infer_config(state: Mapping[str, Any], hf_config: Mapping[str, Any] | None) -> dict[str, Any]:
  """The zoo kwargs (`models.build("lm", **kwargs)`) of a Llama state dict.

  Args:
    state: name -> array (only `.shape` is read).
    hf_config: HF's config (config.json as a dict, or `LlamaConfig.to_dict()`).

  Raises:
    ValueError: without a config (the head counts are not in the shapes),
      for an option the zoo model lacks, or a config that contradicts the
      shapes.
  """
  where = "llama"
  if hf_config is None:
    raise ValueError(f"{where}: the numbers of heads are not in the tensor shapes; pass HF's config "
                     "(config.json as a dict) with num_attention_heads")
  state = canonical_names(state)
  layer0 = f"{PREFIX}layers.0."
  names = {"embed": f"{PREFIX}embed_tokens.weight", "q": f"{layer0}self_attn.q_proj.weight",
           "k": f"{layer0}self_attn.k_proj.weight", "gate": f"{layer0}mlp.gate_proj.weight"}
  for name in names.values():
    if name not in state:
      raise ValueError(f"{where}: missing key {name!r}")
  vocab, d = tuple(state[names["embed"]].shape)
  q_rows, k_rows = state[names["q"]].shape[0], state[names["k"]].shape[0]
  mlp_dim = state[names["gate"]].shape[0]
  depth = lm_table.layer_count(state, rf"{re.escape(PREFIX)}layers\.(\d+)\.", where=where)

  def value(field, default, supported=None):
    return lm_table.config_value(hf_config, field, default, supported, where=f"{where} config")

  for field, from_shapes in (("vocab_size", vocab), ("hidden_size", d), ("num_hidden_layers", depth),
                             ("intermediate_size", mlp_dim)):
    if hf_config.get(field) is not None and hf_config[field] != from_shapes:
      raise ValueError(f"{where} config: {field}={hf_config[field]} but the tensors say {from_shapes}")
  value("hidden_act", "silu", ("silu",))
  heads = value("num_attention_heads", None)
  if not isinstance(heads, int) or heads < 1:
    raise ValueError(f"{where} config: num_attention_heads={heads!r} must be a positive int")
  kv_heads = value("num_key_value_heads", heads)
  head_dim = value("head_dim", d // heads)
  if q_rows != heads * head_dim or k_rows != kv_heads * head_dim:
    raise ValueError(f"{where} config: num_attention_heads={heads}, num_key_value_heads={kv_heads}, "
                     f"head_dim={head_dim} do not fit q_proj's {q_rows} and k_proj's {k_rows} rows")
  attention_bias, mlp_bias = bool(value("attention_bias", False)), bool(value("mlp_bias", False))
  if attention_bias != mlp_bias:
    raise ValueError(f"{where} config: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not "
                     "supported; the zoo model's use_bias puts biases in every projection or none")
  return dict(style="llama", vocab_size=vocab, max_len=int(value("max_position_embeddings", 2048)),
              embed_dim=d, depth=depth, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
              mlp_dim=mlp_dim, rope_base=_rope(hf_config, f"{where} config"),
              norm_epsilon=float(value("rms_norm_eps", 1e-6)), use_bias=attention_bias,
              tie_embeddings=bool(value("tie_word_embeddings", False)))


def _config(kwargs: Mapping[str, Any]) -> lm.LMConfig:
  """The zoo config of `kwargs`, checked to be one HF Llama can hold."""
  cfg = zoo.config("lm", **kwargs)
  for field, hf in _LLAMA_OPTIONS.items():
    if getattr(cfg, field) != hf:
      raise ValueError(f"llama: HF Llama has {field}={hf!r}; the zoo config has {getattr(cfg, field)!r}")
  if len(set(cfg.num_heads)) > 1 or len(set(cfg.num_kv_heads)) > 1 or len(set(cfg.mlp_dim)) > 1:
    raise ValueError(f"llama: HF Llama has one head count, kv head count and intermediate_size for all "
                     f"layers; the zoo config has num_heads={cfg.num_heads}, "
                     f"num_kv_heads={cfg.num_kv_heads}, mlp_dim={cfg.mlp_dim}")
  return cfg


def rows(cfg: lm.LMConfig) -> list[lm_table.Row]:
  """The table above for one configuration: HF name, our path, HF shape, transpose."""
  d, vocab, hd = cfg.embed_dim, cfg.vocab_size, cfg.head_dim

  def row(name, path, shape, transpose=False):
    return lm_table.Row(name, ("params", *path.split("/")), shape, transpose)

  out = [row(f"{PREFIX}embed_tokens.weight", "embed/embedding", (vocab, d))]
  for i, (h, kv, f) in enumerate(zip(cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim)):
    hf, ours = f"{PREFIX}layers.{i}.", f"block{i}/"
    for hf_name, our_name, width_in, width_out in (("self_attn.q_proj", "attn_query", d, h * hd),
                                                   ("self_attn.k_proj", "attn_key", d, kv * hd),
                                                   ("self_attn.v_proj", "attn_value", d, kv * hd),
                                                   ("self_attn.o_proj", "attn_out", h * hd, d),
                                                   ("mlp.gate_proj", "mlp_gate", d, f),
                                                   ("mlp.up_proj", "mlp_up", d, f),
                                                   ("mlp.down_proj", "mlp_down", f, d)):
      out.append(row(f"{hf}{hf_name}.weight", f"{ours}{our_name}/kernel", (width_out, width_in), True))
      if cfg.use_bias:
        out.append(row(f"{hf}{hf_name}.bias", f"{ours}{our_name}/bias", (width_out,)))
    out += [row(f"{hf}input_layernorm.weight", f"{ours}ln_attn/scale", (d,)),
            row(f"{hf}post_attention_layernorm.weight", f"{ours}ln_mlp/scale", (d,))]
  out.append(row(f"{PREFIX}norm.weight", "ln_final/scale", (d,)))
  if not cfg.tie_embeddings:
    out.append(row("lm_head.weight", "lm_head/kernel", (vocab, d), transpose=True))
  return out


CONVERTER = lm_table.lm_converter("llama", infer_config=infer_config, config=_config, rows=rows,
                                   canonical_names=canonical_names, buffer=_BUFFER)
