"""OpenCLIP's ViT image towers (`ViT-B-32` and kin, `model.visual`) <-> the zoo's `vit`.

  class_embedding f[embed], positional_embedding f[tokens, embed] -> cls_token f[1, 1, embed],
                                                          pos_embedding f[1, tokens, embed]
  conv1 (OIHW, no bias)                                  -> patch_embed (HWIO, patch_bias=False)
  ln_pre                                                 -> ln_pre
  transformer.resblocks.{i}.ln_1, ln_2                   -> block{i}/ln_attn, ln_mlp
  transformer.resblocks.{i}.attn.in_proj_weight, in_proj_bias, out_proj
                                                         -> block{i}/attention/{query, key, value}, out
  transformer.resblocks.{i}.mlp.c_fc, mlp.c_proj         -> block{i}/mlp_in, mlp_out
  ln_post                                                -> ln_final
  proj f[embed, output_dim] (x @ proj, no bias)          -> head/kernel (head_bias=False), as it is

The state dict is the tower's own (`model.visual.state_dict()`); a whole
CLIP checkpoint's tower is `{k[len("visual."):]: v for k, v in state.items()
if k.startswith("visual.")}`. The tower is OpenCLIP's default: class-token
pooling (`pool_type="tok"`), LayerNorm epsilon 1e-5, learned position
embeddings, no attentional pooler or layer scale. `library_config` is the
model's OpenCLIP config (`open_clip.get_model_config("ViT-B-32")`, a dict with
`vision_cfg`) or None: its `quick_gelu` (OpenAI's CLIP weights use QuickGELU,
`x sigmoid(1.702 x)`; default False, exact GELU), `vision_cfg.head_width`
(default 64, as OpenCLIP's) and `vision_cfg.norm_kwargs.eps` are read; a
`vision_cfg` asking for another pooling, an attentional pooler, a timm trunk
or other activation arguments is refused.
"""

from collections.abc import Mapping
from typing import Any

from mergejax.io.convert import vision_table
from mergejax.io.convert import vit_names

NAMES = vit_names.ViTNames(
    cls_token="class_embedding", pos_embedding="positional_embedding", token_rank=1, patch="conv1",
    ln_pre="ln_pre", block="transformer.resblocks.{i}", ln_attn="ln_1",
    attention=("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"),
    ln_mlp="ln_2", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", ln_final="ln_post", head="proj",
    head_is_matrix=True,
)
WHERE = "OpenCLIP visual state dict"
# vision_cfg entries whose non-default values the zoo ViT does not compute.
UNSUPPORTED = {"pool_type": ("tok",), "attentional_pool": (False,), "timm_model_name": (None,),
               "act_kwargs": (None, {}), "pos_embed_type": ("learnable",)}


def infer_config(state: Mapping[str, Any], library_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """`models.build("vit", **kwargs)`'s kwargs from the shapes and OpenCLIP's model config."""
  vision_cfg = dict((library_config or {}).get("vision_cfg") or {})
  for key, allowed in UNSUPPORTED.items():
    if key in vision_cfg and vision_cfg[key] not in allowed:
      raise ValueError(f"OpenCLIP vision_cfg: {key}={vision_cfg[key]!r} is not supported"
                       f" (supported: {list(allowed)})")
  embed = vision_table.shape(state, "class_embedding", WHERE)[-1]
  patch = vision_table.shape(state, "conv1.weight", WHERE)[-1]
  depth = vit_names.block_count(state, NAMES, WHERE)
  head_width = vision_cfg.get("head_width", 64)
  if embed % head_width:
    raise ValueError(f"{WHERE}: width {embed} is not a whole number of heads of head_width {head_width}")
  block = NAMES.block
  return {
      "patch_size": patch,
      "embed_dim": embed,
      "depth": depth,
      "num_heads": embed // head_width,
      "head_dim": head_width,
      "mlp_dim": tuple(vision_table.shape(state, f"{block.format(i=i)}.mlp.c_fc.weight", WHERE)[0]
                       for i in range(depth)),
      "num_classes": vision_table.shape(state, "proj", WHERE)[-1],
      "image_size": vit_names.image_size(vision_table.shape(state, "positional_embedding", WHERE)[0], patch, WHERE),
      "ln_pre": "ln_pre.weight" in state,
      "layer_norm_epsilon": (vision_cfg.get("norm_kwargs") or {}).get("eps", 1e-5),
      "activation": "quick_gelu" if (library_config or {}).get("quick_gelu", False) else "gelu",
      "patch_bias": "conv1.bias" in state,
      "head_bias": False,
  }


CONVERTER = vit_names.converter(NAMES, infer_config, WHERE)
