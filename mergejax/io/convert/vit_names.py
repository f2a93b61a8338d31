"""The zoo's ViT as a table in a library's tensor names (timm's `vit_*`, OpenCLIP's image tower).

`ViTNames` holds one library's names; `table(names, kwargs)` lists the
layers of `models.build("vit", **kwargs)` under them. The layout changes are
the same for both libraries: the patch convolution OIHW -> HWIO, Linear
weights transposed, the fused q | k | v projection split into Flax's
query, key and value (`torch_layouts.to_attention`), and the class token and
position embeddings reshaped to the zoo's `f[1, 1, embed]` and
`f[1, tokens, embed]`.
"""

from collections.abc import Callable, Mapping
import math
from typing import Any, NamedTuple

from mergejax.io.convert import vision_table
from mergejax.io.convert.base import Converter
from mergejax.models import zoo


class ViTNames(NamedTuple):
  """One library's tensor names for the zoo ViT's layers (`{i}`: the block index).

  Attributes:
    cls_token, pos_embedding: the class token and position embedding tensors.
    token_rank: their rank in the library (3: `[1, 1, embed]` and
      `[1, tokens, embed]`, timm; 1 and 2: `[embed]` and `[tokens, embed]`, OpenCLIP).
    patch, ln_pre, ln_final: module prefixes (`.weight`, `.bias` appended).
    block: a block's prefix, e.g. "blocks.{i}".
    ln_attn, ln_mlp, mlp_in, mlp_out: module prefixes within a block.
    attention: a block's four attention tensors, within the block: fused
      q | k | v weight and bias, output projection weight and bias.
    head: the head's prefix (a Linear), or the name of a matrix
      `f[embed, out]` applied as `x @ head` (OpenCLIP's `proj`) when `head_is_matrix`.
    head_is_matrix: see `head`.
  """

  cls_token: str
  pos_embedding: str
  token_rank: int
  patch: str
  ln_pre: str
  block: str
  ln_attn: str
  attention: tuple[str, str, str, str]
  ln_mlp: str
  mlp_in: str
  mlp_out: str
  ln_final: str
  head: str
  head_is_matrix: bool


def _weight_bias(prefix: str) -> tuple[str, str]:
  return (f"{prefix}.weight", f"{prefix}.bias")


def table(names: ViTNames, kwargs: Mapping[str, Any]) -> list[vision_table.Entry]:
  """The layers of `models.build("vit", **kwargs)` under the library's `names`.

  Raises:
    ValueError: if `kwargs` has no `image_size` (the position embeddings'
      length follows from it), several task heads, or attention heads whose units do not
      add up to the embedding width (both libraries' attention needs that).
  """
  cfg = zoo.config("vit", **kwargs)
  if cfg.image_size is None:
    raise ValueError("vit: the converters need image_size (the position embeddings' length)")
  if not isinstance(cfg.num_classes, int):
    raise ValueError(f"vit: the libraries' ViTs have one head; got num_classes={cfg.num_classes}")
  e, p = cfg.embed_dim, cfg.patch_size
  tokens = (cfg.image_size // p) ** 2 + 1
  Entry = vision_table.Entry
  lib_cls = (1, 1, e) if names.token_rank == 3 else (e,)
  lib_pos = (1, tokens, e) if names.token_rank == 3 else (tokens, e)
  patch = (f"{names.patch}.weight",) + ((f"{names.patch}.bias",) if cfg.patch_bias else ())
  out = [
      Entry("reshape", (names.cls_token,), ("cls_token",), (lib_cls, (1, 1, e))),
      Entry("reshape", (names.pos_embedding,), ("pos_embedding",), (lib_pos, (1, tokens, e))),
      Entry("conv", patch, ("patch_embed",), (e, 3, p, p)),
  ]
  if cfg.ln_pre:
    out.append(Entry("layer_norm", _weight_bias(names.ln_pre), ("ln_pre",), (e,)))
  for i, (heads, mlp) in enumerate(zip(cfg.num_heads, cfg.mlp_dim)):
    if heads * cfg.head_dim != e:
      raise ValueError(f"vit: block {i} has {heads} heads of {cfg.head_dim} units, not embed_dim {e}")
    lib, path = names.block.format(i=i), f"block{i}"
    out += [
        Entry("layer_norm", _weight_bias(f"{lib}.{names.ln_attn}"), (path, "ln_attn"), (e,)),
        Entry("attention", tuple(f"{lib}.{n}" for n in names.attention), (path, "attention"),
              (e, heads, cfg.head_dim)),
        Entry("layer_norm", _weight_bias(f"{lib}.{names.ln_mlp}"), (path, "ln_mlp"), (e,)),
        Entry("dense", _weight_bias(f"{lib}.{names.mlp_in}"), (path, "mlp_in"), (mlp, e)),
        Entry("dense", _weight_bias(f"{lib}.{names.mlp_out}"), (path, "mlp_out"), (e, mlp)),
    ]
  out.append(Entry("layer_norm", _weight_bias(names.ln_final), ("ln_final",), (e,)))
  if names.head_is_matrix:
    if cfg.head_bias:
      raise ValueError(f"vit: {names.head} has no bias; build the zoo ViT with head_bias=False")
    n = cfg.num_classes
    out.append(Entry("reshape", (names.head,), ("head", "kernel"), ((e, n), (e, n))))
  else:
    head = _weight_bias(names.head) if cfg.head_bias else (f"{names.head}.weight",)
    out.append(Entry("dense", head, ("head",), (cfg.num_classes, e)))
  return out


def block_count(state: Mapping[str, Any], names: ViTNames, where: str) -> int:
  """The number of blocks: i = 0, 1, ... while `{block}.{ln_attn}.weight` is present."""
  depth = 0
  while f"{names.block.format(i=depth)}.{names.ln_attn}.weight" in state:
    depth += 1
  if not depth:
    raise ValueError(f"{where}: no blocks (missing key {names.block.format(i=0)}.{names.ln_attn}.weight)")
  return depth


def image_size(tokens: int, patch_size: int, where: str) -> int:
  """The square image side whose patches and class token make `tokens` positions."""
  grid = math.isqrt(tokens - 1)
  if grid * grid != tokens - 1:
    raise ValueError(f"{where}: {tokens} position embeddings are not a square grid of patches"
                     " plus a class token")
  return grid * patch_size


def config_value(library_config: Mapping[str, Any] | None, key: str, default: Any) -> Any:
  """`library_config[key]`, or `default` where there is no config or no such key."""
  return default if library_config is None else library_config.get(key, default)


def converter(names: ViTNames, infer_config: Callable[..., dict[str, Any]], where: str) -> Converter:
  """The library's `Converter` to the zoo "vit": `infer_config` its own, the rest `table(names, kwargs)`'s.

  Args:
    names: the library's tensor names.
    infer_config: `(state, library_config) -> kwargs` of `models.build("vit", **kwargs)`.
    where: what a state dict is called in errors (e.g. "timm ViT state dict").
  """

  def expected_shapes(kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return vision_table.expected_shapes(table(names, kwargs))

  def to_variables(state: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return vision_table.to_variables(table(names, kwargs), state, where=where)

  def from_variables(variables: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return vision_table.from_variables(table(names, kwargs), variables, where="vit variables")

  return Converter("vit", infer_config, expected_shapes, to_variables, from_variables)
