"""A small decoder-only language model, in GPT-2's or Llama's parameter layout.

    model = models.build("lm", style="gpt2", embed_dim=64, depth=2, num_heads=4, head_dim=16)
    logits = model.apply(variables, ids)          # ids: i32[batch, seq] -> f32[batch, seq, vocab]

Pre-norm blocks (norm, causal self-attention, residual; norm, MLP, residual),
a final norm and the output head; the vocabulary is the 256 byte values by
default. Options: learned position embeddings or RoPE (rotate-half, as HF
Llama); LayerNorm or RMSNorm; a GELU MLP (tanh approximation, GPT-2's
`gelu_new`) or SwiGLU (`down(silu(gate(x)) * up(x))`); multi-head or
grouped-query attention (`num_kv_heads`; query head h reads kv head
`h // (num_heads // num_kv_heads)`, HF's `repeat_kv`); q/k/v fused in one
kernel or separate; biases or none; a head tied to the embedding
(`logits = h @ E^T`) or separate; and `scan=True`, which runs the blocks under
`nn.scan` with their params stacked on a leading layer axis
(`variable_axes={"params": 0}`; `stack_layers`/`unstack_layers` convert).
`moe=dict(num_experts=E, top_k=k)` makes every block's MLP the zoo's sparse
mixture of experts (`mergejax.models.moe.MoE`, reused as it is: a router
`block{i}/moe/router` and E ReLU experts with biases stacked on a leading
axis, `w_in [E, d, f]`, `b_in [E, f]`, `w_out [E, f, d]`, `b_out [E, d]`, f =
`mlp_dim`; the same in both styles), unrolled only (`scan=True` with `moe` is
refused). `mergejax.models.moe.routing_fn(model, "block{i}/moe")` gives a
block's router logits and expert activations (every token a row), and
`mergejax.merge.msmoe` merges its experts.

`style` picks the defaults of the architecture options (any can be given):

  style     positions norm   mlp     heads  qkv       bias  head
  "gpt2"    learned   layer  gelu    MHA    fused     yes   tied
  "llama"   rope      rms    swiglu  GQA    separate  no    separate

(Llama's default `num_kv_heads` is `num_heads // 2` when `num_heads` is
even, else `num_heads`; its default `mlp_dim` is `8 * embed_dim // 3`,
GPT-2's `4 * embed_dim`.)

Parameters and their HF names. A Flax Dense kernel is [in, out]: GPT-2's
Conv1D weights are stored [in, out] already and load as they are; torch
Linear weights (Llama) are [out, in] and load transposed (`.T`). Embedding
tables are [vocab or positions, embed] in both. The converters
`mergejax.io.convert.gpt2` and `.llama` follow these tables both ways (their
docstrings give them from HF's side, with the config fields read; tested
against transformers in tests/test_convert_lm.py).

GPT-2 (`style="gpt2"`; i the layer, d = embed_dim, P = max_len):

  ours (under params/)           HF GPT2LMHeadModel                          shape     load
  embed/embedding                transformer.wte.weight                      [V, d]    as is
  pos_embed                      transformer.wpe.weight                      [P, d]    as is
  block{i}/ln_attn/scale, bias   transformer.h.{i}.ln_1.weight, .bias        [d]       as is
  block{i}/attn_qkv/kernel       transformer.h.{i}.attn.c_attn.weight        [d, 3d]   as is
  block{i}/attn_qkv/bias         transformer.h.{i}.attn.c_attn.bias          [3d]      as is
  block{i}/attn_out/kernel       transformer.h.{i}.attn.c_proj.weight        [d, d]    as is
  block{i}/attn_out/bias         transformer.h.{i}.attn.c_proj.bias          [d]       as is
  block{i}/ln_mlp/scale, bias    transformer.h.{i}.ln_2.weight, .bias        [d]       as is
  block{i}/mlp_up/kernel         transformer.h.{i}.mlp.c_fc.weight           [d, 4d]   as is
  block{i}/mlp_up/bias           transformer.h.{i}.mlp.c_fc.bias             [4d]      as is
  block{i}/mlp_down/kernel       transformer.h.{i}.mlp.c_proj.weight         [4d, d]   as is
  block{i}/mlp_down/bias         transformer.h.{i}.mlp.c_proj.bias           [d]       as is
  ln_final/scale, bias           transformer.ln_f.weight, .bias              [d]       as is
  (tied: no head leaf)           lm_head.weight (tied to wte)                [V, d]    -

  The fused kernel's output axis is q | k | v, each (heads, head_dim)
  head-major, as GPT-2's `split(n_embd, dim=2)` and `_split_heads`; GPT-2
  also has LayerNorm eps 1e-5, `gelu_new` and logits scaled by
  1/sqrt(head_dim), as here. HF's `attn.bias`/`attn.masked_bias` are causal
  mask buffers, not parameters.

Llama (`style="llama"`; H heads, KV kv heads, hd = head_dim, f = mlp_dim):

  ours (under params/)           HF LlamaForCausalLM                         shape       load
  embed/embedding                model.embed_tokens.weight                   [V, d]      as is
  block{i}/ln_attn/scale         model.layers.{i}.input_layernorm.weight     [d]         as is
  block{i}/attn_query/kernel     model.layers.{i}.self_attn.q_proj.weight    [d, H hd]   .T
  block{i}/attn_key/kernel       model.layers.{i}.self_attn.k_proj.weight    [d, KV hd]  .T
  block{i}/attn_value/kernel     model.layers.{i}.self_attn.v_proj.weight    [d, KV hd]  .T
  block{i}/attn_out/kernel       model.layers.{i}.self_attn.o_proj.weight    [H hd, d]   .T
  block{i}/ln_mlp/scale          model.layers.{i}.post_attention_layernorm.weight [d]    as is
  block{i}/mlp_gate/kernel       model.layers.{i}.mlp.gate_proj.weight       [d, f]      .T
  block{i}/mlp_up/kernel         model.layers.{i}.mlp.up_proj.weight         [d, f]      .T
  block{i}/mlp_down/kernel       model.layers.{i}.mlp.down_proj.weight       [f, d]      .T
  ln_final/scale                 model.norm.weight                           [d]         as is
  lm_head/kernel                 lm_head.weight                              [d, V]      .T

  "shape" is ours; HF's Linear weights are its transpose. The q/k/v head
  axis is (heads, head_dim) head-major as HF's `view(b, t, H, hd)`; RoPE is
  HF's rotate-half with `rope_theta` = `rope_base` (default 10000) and
  positions 0..seq-1 (no RoPE scaling); RMSNorm eps is `norm_epsilon` (HF
  `rms_norm_eps`). `rotary_emb.inv_freq` is a buffer, not a parameter.
  `tie_embeddings=True` reads `embed` as the head, as `tie_word_embeddings`.

Other combinations mix the two tables' leaves (e.g. GPT-2 with RMSNorm has
no norm biases; `fused_qkv=True` with GQA is [d, (H + 2 KV) hd], q | k | v).
With `scan=True`, `block{i}/X` is `blocks/X[i]`.

Groups (`groups()`, in forward order; block i of `depth`):

  `embed`: the residual stream: the embedding's and position table's width,
    every norm, the q/k/v (or fused) and MLP input axes, the attention output
    and MLP down kernels' output axes and biases, and the head's input;
  `block{i}.heads` (multi-head, `num_kv_heads == num_heads`): whole heads of
    q, k, v and the output projection's input;
  `block{i}.kv_heads` and `block{i}.q_per_kv` (grouped-query,
    `num_kv_heads < num_heads`): the kv heads (each with its group of query
    heads) and the query heads within a group: the query head axis is the
    product (kv_heads, q_per_kv), kv-major; q_per_kv is never widened,
    except with one kv head (multi-query), where the query heads widen;
  `block{i}.qk_dim`, `block{i}.vo_dim`: the units within each head of
    queries/keys and of values/output projection; never widened (fixed
    groups). With RoPE the q/k units are fixed by the rotation's frequencies
    and pairing, so there is no `qk_dim` group;
  `block{i}.mlp`: the MLP hidden units (SwiGLU: gate and up together);
  `block{i}.experts` instead with `moe`: each expert's hidden units, a
    batched group over the E experts (`AxisRef.batch = 0`, permutation
    int[E, f]: one per expert, as `moe_mlp`'s `experts`); the router's
    expert axis is fixed (top-k).

With `scan=True` the block groups are `blocks.X`, one for all the layers
(every layer has one set of widths): `groups()` is `embed` and `blocks.X`,
the names of the scanned hand spec's batched groups and so of the layouts
that PLeaS and ZipIt! return for it.

`models.build("lm", layout)` widens `embed` (the stream), the head counts and
the MLP hidden widths; head_dim stays. With `scan=True` a layout gives each
`blocks.X` one GroupLayout, every layer's (the unrolled `block{i}.X` names
are refused as unknown groups).

Hand spec: `permutation_spec` lists every group above for the unrolled model.
For `scan=True` it has `embed` (every stacked leaf's stream axis one axis
later, one permutation shared by all layers: the scan's carry) and a batched
group `blocks.X` over the `depth` stacked copies (`AxisRef.batch = 0`,
permutation int[depth, n]; copy l is the unrolled model's `block{l}.X`,
`mergejax.stacked.unstack` names it `blocks.X[l]`). This is what
`trace.permutation_spec` finds.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mergejax import spec as spec_lib
from mergejax.models import config
from mergejax.models import moe as moe_lib

STYLES = {
    "gpt2": dict(positions="learned", norm="layer", mlp="gelu", fused_qkv=True, use_bias=True,
                 tie_embeddings=True),
    "llama": dict(positions="rope", norm="rms", mlp="swiglu", fused_qkv=False, use_bias=False,
                  tie_embeddings=False),
}
_INIT = nn.initializers.normal(stddev=0.02)


def _norm(kind: str, epsilon: float, use_bias: bool, name: str) -> nn.Module:
  if kind == "rms":
    return nn.RMSNorm(epsilon=epsilon, name=name)
  return nn.LayerNorm(epsilon=epsilon, use_bias=use_bias, name=name)


def rope(x: jax.Array, base: float) -> jax.Array:
  """x: f32[batch, seq, heads, head_dim] rotated by position (HF Llama's rotate-half)."""
  t, hd = x.shape[1], x.shape[-1]
  freqs = 1.0 / (base ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]
  angles = jnp.concatenate([angles, angles], -1)[None, :, None, :]
  x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
  return x * jnp.cos(angles) + jnp.concatenate([-x2, x1], -1) * jnp.sin(angles)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Grouped causal attention, kv-major (query head h reads kv head h // n_rep).

  Args:
    q: f32[batch, seq, heads, head_dim].
    k, v: f32[batch, seq, kv_heads, head_dim]; kv_heads divides heads.

  Returns:
    f32[batch, seq, heads * head_dim].
  """
  b, t, h, hd = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, hd)
  logits = jnp.einsum("bqgrd,bkgd->bgrqk", q, k) / math.sqrt(hd)
  mask = jnp.tril(jnp.ones((t, t), bool))
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  out = jnp.einsum("bgrqk,bkgd->bqgrd", jax.nn.softmax(logits, -1), v)
  return out.reshape(b, t, h * hd)


class Block(nn.Module):
  """One pre-norm decoder block: x: f32[batch, seq, embed] -> the same."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  positions: str
  rope_base: float
  norm: str
  norm_epsilon: float
  mlp: str
  fused_qkv: bool
  use_bias: bool
  num_experts: int = 0  # > 0: the MLP is `moe.MoE` with mlp_dim hidden units per expert.
  top_k: int = 0
  scanned: bool = False  # As a scan body: (x, None) -> (x, None).

  @nn.compact
  def __call__(self, x: jax.Array, unused: Any = None) -> jax.Array | tuple[jax.Array, None]:
    del unused
    d = x.shape[-1]
    h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
    dense = lambda n, name: nn.Dense(n, use_bias=self.use_bias, kernel_init=_INIT, name=name)  # noqa: E731
    y = _norm(self.norm, self.norm_epsilon, self.use_bias, "ln_attn")(x)
    b, t = y.shape[:2]
    if self.fused_qkv:
      qkv = dense((h + 2 * kv) * hd, "attn_qkv")(y)
      q, k, v = jnp.split(qkv, [h * hd, (h + kv) * hd], axis=-1)
    else:
      q, k, v = (dense(n * hd, f"attn_{p}")(y) for n, p in ((h, "query"), (kv, "key"), (kv, "value")))
    q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
    if self.positions == "rope":
      q, k = rope(q, self.rope_base), rope(k, self.rope_base)
    x = x + dense(d, "attn_out")(causal_attention(q, k, v))
    y = _norm(self.norm, self.norm_epsilon, self.use_bias, "ln_mlp")(x)
    if self.num_experts:
      x = x + moe_lib.MoE(self.num_experts, self.mlp_dim, self.top_k, name="moe")(y)
      return (x, None) if self.scanned else x
    if self.mlp == "swiglu":
      y = nn.silu(dense(self.mlp_dim, "mlp_gate")(y)) * dense(self.mlp_dim, "mlp_up")(y)
    else:
      y = nn.gelu(dense(self.mlp_dim, "mlp_up")(y), approximate=True)
    x = x + dense(d, "mlp_down")(y)
    return (x, None) if self.scanned else x


class LM(nn.Module):
  """ids: i32[batch, seq] -> logits f32[batch, seq, vocab_size].

  Attributes:
    vocab_size: the vocabulary (256: bytes).
    max_len: the position table's length (learned positions); longer inputs
      are refused.
    embed_dim: the residual stream's width.
    num_heads, num_kv_heads, mlp_dims: per block (with experts: each
      expert's hidden units).
    head_dim: the units of every head.
    positions, rope_base, norm, norm_epsilon, mlp, fused_qkv, use_bias,
      tie_embeddings, scan: as `LMConfig`.
    num_experts, top_k: `LMConfig.moe` (0: dense MLPs).
  """

  vocab_size: int
  max_len: int
  embed_dim: int
  num_heads: tuple[int, ...]
  num_kv_heads: tuple[int, ...]
  head_dim: int
  mlp_dims: tuple[int, ...]
  positions: str = "learned"
  rope_base: float = 10000.0
  norm: str = "layer"
  norm_epsilon: float = 1e-5
  mlp: str = "gelu"
  fused_qkv: bool = True
  use_bias: bool = True
  tie_embeddings: bool = True
  scan: bool = False
  num_experts: int = 0
  top_k: int = 0

  def _block_args(self, i: int) -> dict[str, Any]:
    return dict(
        num_heads=self.num_heads[i], num_kv_heads=self.num_kv_heads[i], head_dim=self.head_dim,
        mlp_dim=self.mlp_dims[i], positions=self.positions, rope_base=self.rope_base,
        norm=self.norm, norm_epsilon=self.norm_epsilon, mlp=self.mlp, fused_qkv=self.fused_qkv,
        use_bias=self.use_bias, num_experts=self.num_experts, top_k=self.top_k,
    )

  @nn.compact
  def __call__(self, ids: jax.Array, train: bool = False) -> jax.Array:
    del train  # No dropout: train and eval compute the same function.
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"lm expects token ids i32[batch, seq], got {ids.dtype}{list(ids.shape)}")
    t = ids.shape[1]
    embed = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=_INIT, name="embed")
    x = embed(ids)
    if self.positions == "learned":
      if t > self.max_len:
        raise ValueError(f"lm: {t} tokens exceed the position table's max_len {self.max_len}")
      table = self.param("pos_embed", _INIT, (self.max_len, self.embed_dim))
      x = x + table[:t]
    depth = len(self.num_heads)
    if self.scan:
      stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=depth)
      x, _ = stack(**self._block_args(0), scanned=True, name="blocks")(x, None)
    else:
      for i in range(depth):
        x = Block(**self._block_args(i), name=f"block{i}")(x)
    x = _norm(self.norm, self.norm_epsilon, self.use_bias, "ln_final")(x)
    if self.tie_embeddings:
      return embed.attend(x).astype(jnp.float32)
    return nn.Dense(self.vocab_size, use_bias=False, kernel_init=_INIT, name="lm_head")(x).astype(jnp.float32)


class MoEOptions(NamedTuple):
  """`LMConfig.moe`: every block's MLP a top-k mixture of `num_experts` experts (`models.moe.MoE`)."""

  num_experts: int
  top_k: int


def _moe_options(value: Any) -> MoEOptions | None:
  """`LMConfig.moe` normalised: None, or a mapping with exactly num_experts and top_k."""
  if value is None:
    return None
  if hasattr(value, "to_dict"):  # an ml_collections.ConfigDict
    value = value.to_dict()
  if isinstance(value, MoEOptions):
    value = value._asdict()
  if not isinstance(value, Mapping) or set(value) != set(MoEOptions._fields):
    raise ValueError(f"lm: moe must be None or dict(num_experts=E, top_k=k), got {value!r}")
  options = MoEOptions(**{k: config.positive_int(f"moe.{k}", value[k]) for k in MoEOptions._fields})
  if options.top_k > options.num_experts:
    raise ValueError(f"lm: moe.top_k {options.top_k} exceeds moe.num_experts {options.num_experts}")
  return options


def _choice(field: str, value: Any, options: Sequence[str]) -> str:
  if value not in options:
    raise ValueError(f"{field} must be one of {', '.join(map(repr, options))}, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig(config.ModelConfig):
  """`models.build("lm", style="llama", embed_dim=64, depth=2, num_heads=4, num_kv_heads=2)`.

  Attributes:
    style: `"gpt2"` or `"llama"`: the defaults of the options left None.
    vocab_size: the vocabulary, 256 (bytes) by default; the head's width.
    max_len: the learned position table's length (unused with RoPE).
    embed_dim: the residual stream's width.
    depth: the number of blocks.
    num_heads: query heads, one count for every block or one per block.
    num_kv_heads: key/value heads (dividing num_heads), per block or one for
      all; None: the style's default.
    head_dim: the units of every head (even with RoPE).
    mlp_dim: the MLP hidden width, per block or one for all; None: the
      style's default.
    positions: `"learned"` or `"rope"`.
    rope_base: RoPE's base (HF `rope_theta`).
    norm: `"layer"` (LayerNorm) or `"rms"` (RMSNorm).
    norm_epsilon: the norms' epsilon.
    mlp: `"gelu"` or `"swiglu"`.
    fused_qkv: q, k, v in one kernel [d, (H + 2 KV) hd] (GPT-2's c_attn).
    use_bias: biases in every Dense layer (and LayerNorm).
    tie_embeddings: the head is the embedding table transposed.
    scan: run the blocks under `nn.scan`, params stacked on a leading axis.
    moe: None (dense MLPs), or `dict(num_experts=E, top_k=k)`: every block's
      MLP is the zoo's mixture of experts (`models.moe.MoE`: a router and E
      ReLU experts with biases, `mlp_dim` hidden units each, in either
      style; `mlp` and `use_bias` then shape only the attention), params
      `block{i}/moe/...`, group `block{i}.experts` (batched over the E
      experts). Stored as a `MoEOptions`. Not with `scan=True`.
    num_classes: the head's width is `vocab_size`; leave it None.
  """

  name = "lm"
  num_classes: int | None = None
  style: str = "gpt2"
  vocab_size: int = 256
  max_len: int = 256
  embed_dim: int = 64
  depth: int = 2
  num_heads: int | Sequence[int] = 4
  num_kv_heads: int | Sequence[int] | None = None
  head_dim: int = 16
  mlp_dim: int | Sequence[int] | None = None
  positions: str | None = None
  rope_base: float = 10000.0
  norm: str | None = None
  norm_epsilon: float = 1e-5
  mlp: str | None = None
  fused_qkv: bool | None = None
  use_bias: bool | None = None
  tie_embeddings: bool | None = None
  scan: bool = False
  moe: Mapping[str, int] | MoEOptions | None = None

  def __post_init__(self):
    for field in ("vocab_size", "max_len", "embed_dim", "depth", "head_dim"):
      config.positive_int(field, getattr(self, field))
    if self.num_classes is not None and self.num_classes != self.vocab_size:
      raise ValueError(
          f"lm: num_classes is the vocabulary, vocab_size={self.vocab_size}; got {self.num_classes!r}"
      )
    self._set("num_classes", self.vocab_size)
    super().__post_init__()
    style = STYLES[_choice("style", self.style, tuple(STYLES))]
    for field, default in style.items():
      if getattr(self, field) is None:
        self._set(field, default)
    _choice("positions", self.positions, ("learned", "rope"))
    _choice("norm", self.norm, ("layer", "rms"))
    _choice("mlp", self.mlp, ("gelu", "swiglu"))
    for field in ("fused_qkv", "use_bias", "tie_embeddings", "scan"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"{field} must be a bool, got {getattr(self, field)!r}")
    if self.positions == "rope" and self.head_dim % 2:
      raise ValueError(f"head_dim must be even with RoPE, got {self.head_dim}")
    if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
      raise ValueError(f"rope_base must be a number > 1, got {self.rope_base!r}")
    if not (isinstance(self.norm_epsilon, (int, float)) and self.norm_epsilon > 0):
      raise ValueError(f"norm_epsilon must be > 0, got {self.norm_epsilon!r}")
    heads = config.per_layer("num_heads", self.num_heads, self.depth)
    self._set("num_heads", heads)
    if self.num_kv_heads is None:
      kv = tuple(h // 2 if self.style == "llama" and h % 2 == 0 else h for h in heads)
    else:
      kv = config.per_layer("num_kv_heads", self.num_kv_heads, self.depth)
    for i, (h, k) in enumerate(zip(heads, kv)):
      if h % k:
        raise ValueError(f"num_kv_heads[{i}] = {k} does not divide num_heads[{i}] = {h}")
    self._set("num_kv_heads", kv)
    if self.mlp_dim is None:
      default = 4 * self.embed_dim if self.mlp == "gelu" else max(1, 8 * self.embed_dim // 3)
      self._set("mlp_dim", (default,) * self.depth)
    else:
      self._set("mlp_dim", config.per_layer("mlp_dim", self.mlp_dim, self.depth))
    if self.scan and (len(set(heads)) > 1 or len(set(kv)) > 1 or len(set(self.mlp_dim)) > 1):
      raise ValueError("lm: scan=True needs the same num_heads, num_kv_heads and mlp_dim in every block")
    self._set("moe", _moe_options(self.moe))
    if self.moe is not None and self.scan:
      raise ValueError("lm: moe with scan=True is not supported (the experts' batched group would sit inside"
                       " the layers' batched group); use scan=False")

  def _grouped(self, i: int) -> bool:
    """Whether block i is grouped-query (fewer kv heads than query heads)."""
    return self.num_kv_heads[i] < self.num_heads[i]

  def _mlp_group(self, blk: str) -> str:
    """The group of a block's MLP hidden units: `{blk}.mlp`, or `{blk}.experts` (batched) with moe."""
    return f"{blk}.mlp" if self.moe is None else f"{blk}.experts"

  def _block_names(self) -> list[str]:
    """Each block's group prefix: `block{i}`, or `blocks` for every block under scan."""
    return ["blocks"] * self.depth if self.scan else [f"block{i}" for i in range(self.depth)]

  def groups(self) -> dict[str, int]:
    out = {"embed": self.embed_dim}
    for i, blk in enumerate(self._block_names()):
      h, kv = self.num_heads[i], self.num_kv_heads[i]
      if self._grouped(i):
        out.update({f"{blk}.kv_heads": kv, f"{blk}.q_per_kv": h // kv})
      else:
        out[f"{blk}.heads"] = h
      if self.positions != "rope":
        out[f"{blk}.qk_dim"] = self.head_dim
      out[f"{blk}.vo_dim"] = self.head_dim
      out[self._mlp_group(blk)] = self.mlp_dim[i]
    return out

  def fixed_groups(self) -> frozenset[str]:
    """head_dim groups, and under GQA the queries per kv head: the kv heads widen and carry
    their queries (as `merge.combine.fixed_groups` lays them out), their count stays. With one
    kv head (multi-query) the kv heads cannot widen (a group of one unit names no axis) and the
    query heads widen instead, all reading the one kv head."""
    sizes = self.groups()
    return frozenset(g for g in sizes if g.endswith(("qk_dim", "vo_dim"))
                     or (g.endswith("q_per_kv") and sizes[g.replace("q_per_kv", "kv_heads")] > 1))

  def module(self, widths: Mapping[str, int]) -> LM:
    heads, kv_heads = [], []
    names = self._block_names()
    for i, blk in enumerate(names):
      if self._grouped(i):
        kv = widths[f"{blk}.kv_heads"]
        kv_heads.append(kv)
        heads.append(kv * widths[f"{blk}.q_per_kv"])
      else:
        heads.append(widths[f"{blk}.heads"])
        kv_heads.append(widths[f"{blk}.heads"])
    mlp_dims = tuple(widths[self._mlp_group(blk)] for blk in names)
    experts = (0, 0) if self.moe is None else self.moe
    return LM(
        vocab_size=self.vocab_size, max_len=self.max_len, embed_dim=widths["embed"],
        num_heads=tuple(heads), num_kv_heads=tuple(kv_heads), head_dim=self.head_dim,
        mlp_dims=mlp_dims, positions=self.positions, rope_base=float(self.rope_base),
        norm=self.norm, norm_epsilon=float(self.norm_epsilon), mlp=self.mlp,
        fused_qkv=self.fused_qkv, use_bias=self.use_bias, tie_embeddings=self.tie_embeddings,
        scan=self.scan, num_experts=experts[0], top_k=experts[1],
    )

  def permutation_spec(self, variables) -> spec_lib.PermutationSpec:
    del variables  # The groups follow from the config alone.
    if self.scan:
      return self._scanned_spec()
    b = config.SpecBuilder(self.groups())
    self._outer_refs(b)
    for i in range(self.depth):
      self._block_refs(b, f"block{i}", i)
    if self.moe is None:
      return b.build()
    experts = {f"block{i}.experts" for i in range(self.depth)}
    refs = {g: [r._replace(batch=0) for r in rs] if g in experts else rs for g, rs in b.refs.items()}
    return spec_lib.PermutationSpec(refs, b.sizes, {g: self.moe.num_experts for g in sorted(experts)})

  def _outer_refs(self, b: config.SpecBuilder) -> None:
    """The stream axes of the leaves outside the blocks: embeddings, final norm, head."""
    b.add("embed", ("params", "embed", "embedding"), 1)
    if self.positions == "learned":
      b.add("embed", ("params", "pos_embed"), 1)
    self._norm_refs(b, ["ln_final"])
    if not self.tie_embeddings:
      b.add("embed", ("params", "lm_head", "kernel"), 0)

  def _block_refs(self, b: config.SpecBuilder, blk: str, i: int, offset: int = 0) -> None:
    """Block i's refs under `params/{blk}`, its groups `{blk}.X`; every axis `offset` later (stacked)."""
    hd = self.head_dim

    def add(group, path, axis, factor=None, part=None):
      if group is not None and b.sizes[group] > 1:
        b.refs[group].append(spec_lib.AxisRef(tuple(path), axis + offset, factor, part))

    h, kv = self.num_heads[i], self.num_kv_heads[i]
    rep = h // kv
    self._norm_refs(b, [blk, "ln_attn"], offset=offset)
    if self._grouped(i):
      head_groups = [(f"{blk}.kv_heads", 0), (f"{blk}.q_per_kv", 1)]
      q_view = (kv, rep, hd)
    else:
      head_groups = [(f"{blk}.heads", 0)]
      q_view = (h, hd)
    qk_dim = f"{blk}.qk_dim" if self.positions != "rope" else None
    vo_dim = f"{blk}.vo_dim"
    # (leaf, width in units, head groups with their component in the leaf's
    # view, view, head_dim group): q | k | v.
    kv_view = (kv, hd)
    kv_head = [(head_groups[0][0], 0)]
    projections = [("query", h * hd, head_groups, q_view, qk_dim),
                   ("key", kv * hd, kv_head, kv_view, qk_dim),
                   ("value", kv * hd, kv_head, kv_view, vo_dim)]
    start = 0
    for proj, width, groups, view, within in projections:
      if self.fused_qkv:
        leaf, part = ("params", blk, "attn_qkv"), (start, start + width)
      else:
        leaf, part = ("params", blk, f"attn_{proj}"), None
      start += width
      if not self.fused_qkv or proj == "query":
        add("embed", (*leaf, "kernel"), 0)
      names = [("kernel", 1)] + ([("bias", 0)] if self.use_bias else [])
      for name, axis in names:
        for g, component in groups:
          add(g, (*leaf, name), axis, (view, component), part)
        add(within, (*leaf, name), axis, (view, len(view) - 1), part)
    out = ("params", blk, "attn_out")
    for g, component in head_groups:
      add(g, (*out, "kernel"), 0, (q_view, component))
    add(vo_dim, (*out, "kernel"), 0, (q_view, len(q_view) - 1))
    add("embed", (*out, "kernel"), 1)
    if self.use_bias:
      add("embed", (*out, "bias"), 0)
    self._norm_refs(b, [blk, "ln_mlp"], offset=offset)
    if self.moe is not None:
      moe = ("params", blk, "moe")
      for leaf, axis in ((("router", "kernel"), 0), (("w_in",), 1), (("w_out",), 2), (("b_out",), 1)):
        add("embed", (*moe, *leaf), axis)
      for leaf, axis in (("w_in", 2), ("b_in", 1), ("w_out", 1)):
        add(f"{blk}.experts", (*moe, leaf), axis)  # batched over the experts (permutation_spec)
      return
    for name in ("mlp_gate", "mlp_up") if self.mlp == "swiglu" else ("mlp_up",):
      add("embed", ("params", blk, name, "kernel"), 0)
      add(f"{blk}.mlp", ("params", blk, name, "kernel"), 1)
      if self.use_bias:
        add(f"{blk}.mlp", ("params", blk, name, "bias"), 0)
    add(f"{blk}.mlp", ("params", blk, "mlp_down", "kernel"), 0)
    add("embed", ("params", blk, "mlp_down", "kernel"), 1)
    if self.use_bias:
      add("embed", ("params", blk, "mlp_down", "bias"), 0)

  def _norm_refs(self, b: config.SpecBuilder, name: list[str], *, offset: int = 0) -> None:
    b.add("embed", ("params", *name, "scale"), offset)
    if self.norm == "layer" and self.use_bias:
      b.add("embed", ("params", *name, "bias"), offset)

  def _scanned_spec(self) -> spec_lib.PermutationSpec:
    """`embed` over the stacked leaves' stream axes (one axis later), and each
    block group as a batched group `blocks.X` over `depth` copies (batch axis 0)."""
    sizes = self.groups()
    b = config.SpecBuilder(sizes)
    self._outer_refs(b)
    self._block_refs(b, "blocks", 0, offset=1)
    refs = {g: rs if g == "embed" else [r._replace(batch=0) for r in rs] for g, rs in b.refs.items()}
    return spec_lib.PermutationSpec(refs, sizes, {g: self.depth for g in sizes if g != "embed"})


_BLOCK = re.compile(r"block(\d+)$")


def stack_layers(variables: Mapping[str, Any]) -> dict[str, Any]:
  """An unrolled model's variables as the `scan=True` model's.

  Every collection's `block0`, `block1`, ... (all of one structure and
  shapes) become one `blocks` whose leaves are the layers' leaves stacked on
  a new leading axis; everything else is kept.

  Raises:
    ValueError: if the blocks are not numbered 0..L-1 or differ in structure
      or shapes.
  """
  out = {}
  for collection, tree in variables.items():
    blocks = {int(m.group(1)): k for k in tree if (m := _BLOCK.match(k))}
    if sorted(blocks) != list(range(len(blocks))):
      raise ValueError(f"stack_layers: {collection} has blocks {sorted(blocks)}, not 0..L-1")
    rest = {k: v for k, v in tree.items() if not _BLOCK.match(k)}
    if blocks:
      layers = [tree[blocks[i]] for i in range(len(blocks))]
      first = jax.tree.map(np.shape, layers[0])
      for i, layer in enumerate(layers):
        if jax.tree.structure(layer) != jax.tree.structure(layers[0]) or jax.tree.map(np.shape, layer) != first:
          raise ValueError(f"stack_layers: block{i} differs in structure or shapes from block0")
      rest["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    out[collection] = rest
  return out


def unstack_layers(variables: Mapping[str, Any]) -> dict[str, Any]:
  """A `scan=True` model's variables as the unrolled model's (`stack_layers`' inverse)."""
  out = {}
  for collection, tree in variables.items():
    rest = {k: v for k, v in tree.items() if k != "blocks"}
    if "blocks" in tree:
      sizes = {leaf.shape[0] for leaf in jax.tree.leaves(tree["blocks"])}
      if len(sizes) != 1:
        raise ValueError(f"unstack_layers: {collection}/blocks leaves disagree on the layer count {sizes}")
      for i in range(sizes.pop()):
        rest[f"block{i}"] = jax.tree.map(lambda x, i=i: x[i], tree["blocks"])
    out[collection] = rest
  return out
