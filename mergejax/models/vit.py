"""A small Vision Transformer (Dosovitskiy et al. 2021), pre-LayerNorm.

Non-overlapping patches are embedded by a strided convolution, a class token is
prepended, learned position embeddings are added, and `depth` encoder blocks
(LayerNorm, multi-head self-attention, residual; LayerNorm, GELU MLP, residual)
are followed by a final LayerNorm; the head(s) read the class token. Every
block has its own head count (`num_heads` may be a per-block sequence) and MLP
width; all heads have `head_dim` units.

Options for the layouts of timm's `vit_*` and OpenCLIP's image towers
(`mergejax.io.convert`), each defaulting to the zoo's own choice: `ln_pre` (a
LayerNorm after the position embeddings, before the first block: OpenCLIP's
`ln_pre`, timm's `norm_pre`), `layer_norm_epsilon` (1e-6 as timm; OpenCLIP
uses 1e-5), `activation` of the MLPs ("gelu" exact, "gelu_tanh", or
"quick_gelu" `x sigmoid(1.702 x)` of OpenAI's CLIP), `patch_bias` (OpenCLIP's
patch convolution has none), `head_bias` (OpenCLIP's output projection `proj`
is the head without a bias), and `image_size` (the side of the square input
the position embeddings are made for; None takes it from the input at init).

Groups:
  `embed`: the residual stream (patch embedding, class token, position
    embeddings, every LayerNorm, attention and MLP input and output);
  `block{i}.heads`: block i's attention heads, permuted as whole heads;
  `block{i}.qk_dim`, `block{i}.vo_dim`: the units within each head of the
    queries and keys, and of the values and the output projection; a merged
    model never widens these (only head counts grow);
  `block{i}.mlp`: block i's MLP hidden units.
"""

from collections.abc import Mapping, Sequence
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mergejax import spec
from mergejax.models import config
from mergejax.models import heads
from mergejax.models import layers


ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


class EncoderBlock(nn.Module):
  """x: f32[batch, tokens, embed] -> f32[batch, tokens, embed]."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  layer_norm_epsilon: float = 1e-6
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    embed = x.shape[-1]
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="ln_attn")(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=self.num_heads * self.head_dim,
        out_features=embed, name="attention",
    )(y)
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="ln_mlp")(x)
    y = ACTIVATIONS[self.activation](nn.Dense(self.mlp_dim, name="mlp_in")(y))
    return x + nn.Dense(embed, name="mlp_out")(y)


class ViT(nn.Module):
  """x: f32[batch, h, w, c] -> logits f32[batch, num_classes].

  Attributes:
    patch_size: side of the square patches; it divides h and w.
    embed_dim: the residual stream's width.
    num_heads: each block's head count.
    head_dim: the units of every head.
    mlp_dims: each block's MLP hidden width.
    num_classes: an int (head `head`) or a tuple (heads `head_0`, ...).
    ln_pre, layer_norm_epsilon, activation, patch_bias, head_bias, image_size:
      as in the module docstring.
  """

  patch_size: int
  embed_dim: int
  num_heads: tuple[int, ...]
  head_dim: int
  mlp_dims: tuple[int, ...]
  num_classes: heads.NumClasses
  ln_pre: bool = False
  layer_norm_epsilon: float = 1e-6
  activation: str = "gelu"
  patch_bias: bool = True
  head_bias: bool = True
  image_size: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    del train  # No dropout: train and eval compute the same function.
    layers.check_image("vit", x)
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"vit: patch_size {p} does not divide the {x.shape[1]}x{x.shape[2]} input")
    if self.image_size is not None and x.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(
          f"vit: built for {self.image_size}x{self.image_size} images, got a"
          f" {x.shape[1]}x{x.shape[2]} input"
      )
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
                name="patch_embed")(x)
    x = x.reshape(x.shape[0], -1, self.embed_dim)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.embed_dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.embed_dim)), x], axis=1)
    x = x + self.param(
        "pos_embedding", nn.initializers.normal(stddev=0.02), (1, x.shape[1], self.embed_dim)
    )
    if self.ln_pre:
      x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="ln_pre")(x)
    for i, (h, mlp_dim) in enumerate(zip(self.num_heads, self.mlp_dims)):
      x = EncoderBlock(
          num_heads=h, head_dim=self.head_dim, mlp_dim=mlp_dim,
          layer_norm_epsilon=self.layer_norm_epsilon, activation=self.activation, name=f"block{i}",
      )(x)
    x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="ln_final")(x)
    return heads.task_heads(x[:, 0], self.num_classes, use_bias=self.head_bias)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig(config.ModelConfig):
  """`models.build("vit", depth=4, num_heads=(4, 4, 2, 2), ...)`.

  Attributes:
    patch_size: side of the square patches.
    embed_dim: the residual stream's width.
    depth: the number of encoder blocks.
    num_heads: one head count for every block, or one per block.
    head_dim: the units of every head.
    mlp_dim: one MLP hidden width for every block, or one per block.
    ln_pre: a LayerNorm before the first block (OpenCLIP's `ln_pre`).
    layer_norm_epsilon: every LayerNorm's epsilon.
    activation: the MLPs' nonlinearity, one of `ACTIVATIONS`.
    patch_bias: whether the patch convolution has a bias.
    head_bias: whether the head(s) have a bias.
    image_size: the side of the square input, or None (taken from the input).
  """

  name = "vit"
  patch_size: int = 4
  embed_dim: int = 64
  depth: int = 4
  num_heads: int | Sequence[int] = 4
  head_dim: int = 16
  mlp_dim: int | Sequence[int] = 128
  ln_pre: bool = False
  layer_norm_epsilon: float = 1e-6
  activation: str = "gelu"
  patch_bias: bool = True
  head_bias: bool = True
  image_size: int | None = None

  def __post_init__(self):
    super().__post_init__()
    for field in ("patch_size", "embed_dim", "depth", "head_dim"):
      config.positive_int(field, getattr(self, field))
    for field in ("ln_pre", "patch_bias", "head_bias"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"{field} must be a bool, got {getattr(self, field)!r}")
    eps = self.layer_norm_epsilon
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
      raise ValueError(f"layer_norm_epsilon must be a positive number, got {eps!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
    if self.image_size is not None:
      config.positive_int("image_size", self.image_size)
      if self.image_size % self.patch_size:
        raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
    self._set("num_heads", config.per_layer("num_heads", self.num_heads, self.depth))
    self._set("mlp_dim", config.per_layer("mlp_dim", self.mlp_dim, self.depth))

  def groups(self) -> dict[str, int]:
    out = {"embed": self.embed_dim}
    for i, (h, mlp_dim) in enumerate(zip(self.num_heads, self.mlp_dim)):
      out.update({
          f"block{i}.heads": h,
          f"block{i}.qk_dim": self.head_dim,
          f"block{i}.vo_dim": self.head_dim,
          f"block{i}.mlp": mlp_dim,
      })
    return out

  def fixed_groups(self) -> frozenset[str]:
    return frozenset(g for g in self.groups() if g.endswith(("qk_dim", "vo_dim")))

  def permutation_spec(self, variables) -> spec.PermutationSpec:
    del variables  # The groups follow from the config alone.
    b = config.SpecBuilder(self.groups())
    b.conv(["patch_embed"], None, "embed", bias=self.patch_bias)
    b.add("embed", ("params", "cls_token"), 2)
    b.add("embed", ("params", "pos_embedding"), 2)
    if self.ln_pre:
      b.norm(["ln_pre"], "embed", running=False)
    for i in range(self.depth):
      block, heads = f"block{i}", f"block{i}.heads"
      b.norm([block, "ln_attn"], "embed", running=False)
      for proj, within in (("query", "qk_dim"), ("key", "qk_dim"), ("value", "vo_dim")):
        path = ("params", block, "attention", proj)
        for axis, g in ((0, "embed"), (1, heads), (2, f"{block}.{within}")):
          b.add(g, (*path, "kernel"), axis)
        b.add(heads, (*path, "bias"), 0)
        b.add(f"{block}.{within}", (*path, "bias"), 1)
      out = ("params", block, "attention", "out")
      for axis, g in ((0, heads), (1, f"{block}.vo_dim"), (2, "embed")):
        b.add(g, (*out, "kernel"), axis)
      b.add("embed", (*out, "bias"), 0)
      b.norm([block, "ln_mlp"], "embed", running=False)
      b.dense([block, "mlp_in"], "embed", f"{block}.mlp")
      b.dense([block, "mlp_out"], f"{block}.mlp", "embed")
    b.norm(["ln_final"], "embed", running=False)
    b.heads(self.num_classes, "embed")
    return b.build()

  def module(self, widths: Mapping[str, int]) -> ViT:
    blocks = range(self.depth)
    return ViT(
        patch_size=self.patch_size,
        embed_dim=widths["embed"],
        num_heads=tuple(widths[f"block{i}.heads"] for i in blocks),
        head_dim=self.head_dim,
        mlp_dims=tuple(widths[f"block{i}.mlp"] for i in blocks),
        num_classes=self.num_classes,
        ln_pre=self.ln_pre,
        layer_norm_epsilon=self.layer_norm_epsilon,
        activation=self.activation,
        patch_bias=self.patch_bias,
        head_bias=self.head_bias,
        image_size=self.image_size,
    )
