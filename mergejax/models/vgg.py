"""VGG-style CNN: 3x3 convolutions (BatchNorm optional), 2x2 max pools, Dense layers.

`features` lists the convolutions' widths with "M" for a 2x2 max pool, as in
the VGG paper's configurations; the feature map is flattened (spatial position
by position, channels last) into the hidden Dense layers `dense`, then the
head(s). The default suits 8x8 to 32x32 inputs; VGG-11 for CIFAR is
`features=(64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")`.

Groups: `conv_{i}`, the channels of convolution i (pools not counted), and
`dense_{i}`, the units of hidden Dense layer i.
"""

from collections.abc import Mapping, Sequence
import dataclasses

import flax.linen as nn
import jax

from mergejax import spec
from mergejax.models import config
from mergejax.models import heads
from mergejax.models import layers

POOL = "M"


class VGG(nn.Module):
  """x: f32[batch, h, w, c] -> logits f32[batch, num_classes].

  Attributes:
    features: convolution widths, and "M" for each 2x2 max pool.
    dense: widths of the hidden Dense layers after the flatten.
    batch_norm: BatchNorm (collection `batch_stats`) after every convolution,
      whose bias it replaces.
    num_classes: an int (head `head`) or a tuple (heads `head_0`, ...).
  """

  features: tuple[int | str, ...]
  dense: tuple[int, ...]
  batch_norm: bool
  num_classes: heads.NumClasses

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    layers.check_image("vgg", x)
    conv = 0
    for width in self.features:
      if width == POOL:
        if min(x.shape[1:3]) < 2:
          raise ValueError(
              f"vgg: input too small for {self.features.count(POOL)} max pools (a 2x2"
              f" pool meets a {x.shape[1]}x{x.shape[2]} feature map)"
          )
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = nn.Conv(width, (3, 3), padding=1, use_bias=not self.batch_norm, name=f"conv_{conv}")(x)
      if self.batch_norm:
        x = layers.batch_norm(train, f"bn_{conv}")(x)
      x = nn.relu(x)
      conv += 1
    x = layers.flatten_dense_relu(x, self.dense, "dense")
    return heads.task_heads(x, self.num_classes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VGGConfig(config.ModelConfig):
  """`models.build("vgg", features=(64, 64, "M", ...), dense=(512,), batch_norm=True)`."""

  name = "vgg"
  features: Sequence[int | str] = (64, 64, POOL, 128, 128, POOL, 256, 256, POOL)
  dense: Sequence[int] = (512,)
  batch_norm: bool = True

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.features, str) or not isinstance(self.features, Sequence):
      raise ValueError(f"features must be a sequence of widths and {POOL!r}, got {self.features!r}")
    features = tuple(
        f if f == POOL else config.positive_int(f"features[{i}]", f)
        for i, f in enumerate(self.features)
    )
    if all(f == POOL for f in features):
      raise ValueError(f"features must hold at least one convolution, got {features}")
    self._set("features", features)
    self._set("dense", config.positive_ints("dense", self.dense))
    if not isinstance(self.batch_norm, bool):
      raise ValueError(f"batch_norm must be a bool, got {self.batch_norm!r}")

  def groups(self) -> dict[str, int]:
    convs = [f for f in self.features if f != POOL]
    return {
        **{f"conv_{i}": width for i, width in enumerate(convs)},
        **{f"dense_{i}": width for i, width in enumerate(self.dense)},
    }

  def permutation_spec(self, variables) -> spec.PermutationSpec:
    b = config.SpecBuilder(self.groups())
    convs = [g for g in self.groups() if g.startswith("conv_")]
    for i, g in enumerate(convs):
      b.conv([g], convs[i - 1] if i else None, g, bias=not self.batch_norm)
      if self.batch_norm:
        b.norm([f"bn_{i}"], g, running=True)
    # The flatten: dense_0 (or the heads) read (h * w, channels) of the last
    # conv, position by position; h * w is known from the variables only.
    last, channels = convs[-1], self.groups()[convs[-1]]
    reader = "dense_0" if self.dense else ("head" if isinstance(self.num_classes, int) else "head_0")
    try:
      flat = variables["params"][reader]["kernel"].shape[0]
    except (KeyError, TypeError, IndexError) as e:
      raise ValueError(f"vgg: the variables have no params/{reader}/kernel to read the flatten from") from e
    if flat % channels:
      raise ValueError(
          f"vgg: params/{reader}/kernel axis 0 has {flat} inputs, not a multiple of the last"
          f" convolution's {channels} channels"
      )
    factor = ((flat // channels, channels), 1)
    previous = last
    for i in range(len(self.dense)):
      b.dense([f"dense_{i}"], previous, f"dense_{i}", in_factor=factor if i == 0 else None)
      previous = f"dense_{i}"
    b.heads(self.num_classes, previous, in_factor=None if self.dense else factor)
    return b.build()

  def module(self, widths: Mapping[str, int]) -> VGG:
    convs = iter(widths[f"conv_{i}"] for i in range(len(self.features) - self.features.count(POOL)))
    return VGG(
        features=tuple(POOL if f == POOL else next(convs) for f in self.features),
        dense=tuple(widths[f"dense_{i}"] for i in range(len(self.dense))),
        batch_norm=self.batch_norm,
        num_classes=self.num_classes,
    )
