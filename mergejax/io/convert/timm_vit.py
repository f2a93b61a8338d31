"""timm's `vit_*` VisionTransformers <-> the zoo's `vit`.

  cls_token f[1, 1, embed], pos_embed f[1, tokens, embed] -> cls_token, pos_embedding
  patch_embed.proj (OIHW)                    -> patch_embed (HWIO)
  norm_pre (CLIP ports, `pre_norm=True`)     -> ln_pre
  blocks.{i}.norm1, norm2                    -> block{i}/ln_attn, ln_mlp
  blocks.{i}.attn.qkv, attn.proj             -> block{i}/attention/{query, key, value}, out
  blocks.{i}.mlp.fc1, mlp.fc2                -> block{i}/mlp_in, mlp_out
  norm, head                                 -> ln_final, head

The model is timm's default `global_pool="token"` ViT (the head reads the
class token after `norm`; no `fc_norm`, register tokens, layer scale or
q/k norms: their tensors are refused as unexpected keys). Shapes give the
widths, depth, patch and image size, and whether the patch convolution, the
head and `norm_pre` are there; they cannot give the head count, the
LayerNorm epsilon or the activation. `library_config` (a dict, or None) may
set them:

  num_heads           default embed_dim // 64 (every timm `vit_*` has 64-unit heads)
  layer_norm_epsilon  default 1e-6, or 1e-5 where `norm_pre` is present (timm's
                      CLIP ports use torch's LayerNorm default)
  activation          "gelu" (default), "gelu_tanh", or "quick_gelu" (`*_clip_quickgelu_*`)
"""

from collections.abc import Mapping
from typing import Any

from mergejax.io.convert import vision_table
from mergejax.io.convert import vit_names

NAMES = vit_names.ViTNames(
    cls_token="cls_token", pos_embedding="pos_embed", token_rank=3, patch="patch_embed.proj",
    ln_pre="norm_pre", block="blocks.{i}", ln_attn="norm1",
    attention=("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"),
    ln_mlp="norm2", mlp_in="mlp.fc1", mlp_out="mlp.fc2", ln_final="norm", head="head",
    head_is_matrix=False,
)
LIBRARY_CONFIG_KEYS = ("num_heads", "layer_norm_epsilon", "activation")
WHERE = "timm ViT state dict"


def infer_config(state: Mapping[str, Any], library_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """`models.build("vit", **kwargs)`'s kwargs from the shapes and `library_config` (see above)."""
  unknown = sorted(set(library_config or {}) - set(LIBRARY_CONFIG_KEYS))
  if unknown:
    raise ValueError(f"timm ViT library_config: unknown keys {unknown}; known: {list(LIBRARY_CONFIG_KEYS)}")
  embed = vision_table.shape(state, "cls_token", WHERE)[-1]
  patch = vision_table.shape(state, "patch_embed.proj.weight", WHERE)[-1]
  depth = vit_names.block_count(state, NAMES, WHERE)
  default_heads = embed // 64 if embed % 64 == 0 else None
  num_heads = vit_names.config_value(library_config, "num_heads", default_heads)
  if num_heads is None or embed % num_heads:
    raise ValueError(f"{WHERE}: embed_dim {embed} is not {num_heads or '64-unit'} heads;"
                     " give library_config={'num_heads': ...}")
  ln_pre = "norm_pre.weight" in state
  return {
      "patch_size": patch,
      "embed_dim": embed,
      "depth": depth,
      "num_heads": num_heads,
      "head_dim": embed // num_heads,
      "mlp_dim": tuple(vision_table.shape(state, f"blocks.{i}.mlp.fc1.weight", WHERE)[0] for i in range(depth)),
      "num_classes": vision_table.shape(state, "head.weight", WHERE)[0],
      "image_size": vit_names.image_size(vision_table.shape(state, "pos_embed", WHERE)[-2], patch, WHERE),
      "ln_pre": ln_pre,
      "layer_norm_epsilon": vit_names.config_value(library_config, "layer_norm_epsilon", 1e-5 if ln_pre else 1e-6),
      "activation": vit_names.config_value(library_config, "activation", "gelu"),
      "patch_bias": "patch_embed.proj.bias" in state,
      "head_bias": "head.bias" in state,
  }


CONVERTER = vit_names.converter(NAMES, infer_config, WHERE)
