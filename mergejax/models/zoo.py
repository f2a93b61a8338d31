"""The zoo by name: `names()`, `config()`, `groups()` and `build()`.

    sizes = groups("resnet20", width_multiplier=2)       # {"stage0": 32, ...}
    layout = MergeLayout.from_ratios(sizes, 0.5)
    model = build("resnet20", layout, width_multiplier=2)  # the merged architecture

Everything is checked before a module exists: the model name, every config
keyword, and the layout (the same groups as the model, each splitting the
original units into merged and kept ones, head_dim groups never widened).
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import flax.linen as nn

from mergejax import spec
from mergejax.models import config as config_lib
from mergejax.models import lm
from mergejax.models import mlp
from mergejax.models import moe
from mergejax.models import resnet
from mergejax.models import vgg
from mergejax.models import vit

_ZOO: dict[str, type[config_lib.ModelConfig]] = {
    c.name: c
    for c in (
        mlp.MLPConfig, vgg.VGGConfig, resnet.ResNet20Config,
        resnet.ResNet18Config, resnet.ResNet50Config, vit.ViTConfig, lm.LMConfig, moe.MoEMLPConfig,
    )
}


def names() -> tuple[str, ...]:
  """The zoo's model names."""
  return tuple(_ZOO)


def config(name: str, **kwargs: Any) -> config_lib.ModelConfig:
  """The checked configuration of model `name`; defaults fill what is not given.

  Raises:
    ValueError: for an unknown model, an unknown keyword, or a bad value.
  """
  if name not in _ZOO:
    raise ValueError(f"unknown model {name!r}; the zoo has {', '.join(_ZOO)}")
  cls = _ZOO[name]
  known = sorted(f.name for f in dataclasses.fields(cls))
  unknown = sorted(set(kwargs) - set(known))
  if unknown:
    raise ValueError(f"{name}: unknown config keys {unknown}; known: {', '.join(known)}")
  return cls(**kwargs)


def groups(name: str, **kwargs: Any) -> dict[str, int]:
  """Group name -> original size, in forward order, of model `name`."""
  return config(name, **kwargs).groups()


def permutation_spec(name: str, variables: Any, **kwargs: Any) -> spec.PermutationSpec:
  """The hand-written permutation spec of model `name` (an override, and the
  oracle the traced `mergejax.permutation_spec` is tested against).

  Args:
    name: one of `names()`.
    variables: the model's variables, or their shapes from `jax.eval_shape`.
    **kwargs: the model's configuration, as for `build`.
  """
  result = config(name, **kwargs).permutation_spec(variables)
  spec.check_spec(result, variables)
  return result


def check_layout(cfg: config_lib.ModelConfig, layout: Mapping[str, Any]) -> spec.MergeLayout:
  """`layout` as a MergeLayout, if it fits the original model `cfg`.

  Raises:
    ValueError: naming the groups that are missing or unknown, a group whose
      `n_merged + n_a` or `n_merged + n_b` is not its original size, or a
      widened head_dim group.
  """
  layout = layout if isinstance(layout, spec.MergeLayout) else spec.MergeLayout(layout)
  sizes = cfg.groups()
  missing, unknown = sorted(set(sizes) - set(layout)), sorted(set(layout) - set(sizes))
  if missing or unknown:
    raise ValueError(
        f"{cfg.name}: the layout does not fit the model's groups: missing {missing},"
        f" unknown {unknown}"
    )
  for g, n in sizes.items():
    m, a, b = layout[g]
    if m + a != n or m + b != n:
      raise ValueError(
          f"{cfg.name}: group {g!r} has {n} units but its layout {(m, a, b)} gives"
          f" model A {m + a} and model B {m + b} (n_merged + n_a = n_merged + n_b = {n})"
      )
    if g in cfg.fixed_groups() and layout[g].width != n:
      raise ValueError(
          f"{cfg.name}: group {g!r} is never widened (a head_dim, or the query heads per kv head"
          f" under GQA, which the kv heads carry); merge it fully, layout ({n}, 0, 0)"
      )
  return layout


def build(name: str, layout: Mapping[str, Any] | None = None, **kwargs: Any) -> nn.Module:
  """The Flax module of model `name`, at the widths of `layout`.

  Args:
    name: one of `names()`.
    layout: a `MergeLayout` (or a mapping group -> (n_merged, n_a, n_b)) over
      exactly the model's `groups(name, **kwargs)`; each group is
      `n_merged + n_a + n_b` units wide. None builds the original model.
    **kwargs: the model's configuration (see its config class), e.g.
      `features=(128, 128)`, `num_classes=(5, 5)` for two task heads.

  Returns:
    A Flax linen module; `model.apply(variables, x, train=False)`. Models with
    BatchNorm keep running statistics in `batch_stats`.

  Raises:
    ValueError: before anything is built, for an unknown name or keyword, a bad
      value, or a layout that does not fit the model.
  """
  cfg = config(name, **kwargs)
  widths = cfg.groups() if layout is None else check_layout(cfg, layout).widths()
  return cfg.module(widths)
