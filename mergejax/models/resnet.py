"""ResNets: ResNet-20 (CIFAR-style) and ResNet-18 / ResNet-50 (ImageNet-style).

ResNet-20 (He et al. 2016, section 4.2): a 3x3 stem, three stages of three
basic blocks at widths (16, 32, 64) times `width_multiplier`, global average
pooling. ResNet-18 and ResNet-50 follow torchvision: a 7x7 stride-2 stem and a
3x3 stride-2 max pool, four stages of basic blocks (ResNet-18) or bottleneck
blocks with expansion 4 and the stride on the 3x3 convolution (ResNet-50,
"v1.5"). A stage's first block projects its shortcut (1x1 convolution and
BatchNorm) where it changes the width or the resolution. Convolutions have no
bias; every one is followed by BatchNorm (collection `batch_stats`). Padding
is symmetric, as in PyTorch.

Groups:
  `stage{s}`: the residual stream of stage s, shared by every block's output
    and shortcut (and the stem's output when stage 0's first block keeps an
    identity shortcut, as in ResNet-20 and ResNet-18);
  `stem`: the stem's output, where it has a group of its own (ResNet-50);
  `stage{s}.block{b}.conv{j}`: the output of a block's inner convolution j
    (one per basic block, two per bottleneck block).
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax

from mergejax import spec
from mergejax.models import config
from mergejax.models import heads
from mergejax.models import layers


def _conv(width: int, kernel: int, stride: int, name: str) -> nn.Conv:
  return nn.Conv(
      width, (kernel, kernel), strides=(stride, stride), padding=kernel // 2,
      use_bias=False, name=name,
  )


class ResidualBlock(nn.Module):
  """A basic block (one inner width) or a bottleneck block (two).

  Attributes:
    inner: the inner convolutions' widths, `(w,)` (3x3, 3x3) or `(w, w)`
      (1x1, 3x3, 1x1).
    out: the width of the output, the residual stream.
    stride: the block's spatial stride (on the 3x3 convolution).
    projection: whether the shortcut is a 1x1 convolution and BatchNorm.
  """

  inner: tuple[int, ...]
  out: int
  stride: int
  projection: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if len(self.inner) == 1:
      kernels, strides = (3, 3), (self.stride, 1)
    else:
      kernels, strides = (1, 3, 1), (1, self.stride, 1)
    widths = self.inner + (self.out,)
    y = x
    for j, (width, kernel, stride) in enumerate(zip(widths, kernels, strides)):
      y = layers.batch_norm(train, f"bn{j}")(_conv(width, kernel, stride, f"conv{j}")(y))
      if j < len(widths) - 1:
        y = nn.relu(y)
    shortcut = x
    if self.projection:
      shortcut = layers.batch_norm(train, "proj_bn")(_conv(self.out, 1, self.stride, "proj_conv")(x))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """x: f32[batch, h, w, c] -> logits f32[batch, num_classes].

  Attributes:
    stem: "cifar" (3x3 convolution) or "imagenet" (7x7 stride 2, max pool).
    stem_width: the stem's output width.
    stage_widths: each stage's residual stream width.
    inner_widths: `[stage][block]` -> the block's inner widths.
    projections: whether each stage's first block projects its shortcut.
    num_classes: an int (head `head`) or a tuple (heads `head_0`, ...).
  """

  stem: str
  stem_width: int
  stage_widths: tuple[int, ...]
  inner_widths: tuple[tuple[tuple[int, ...], ...], ...]
  projections: tuple[bool, ...]
  num_classes: heads.NumClasses

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    layers.check_image("resnet", x)
    if self.stem == "cifar":
      x = _conv(self.stem_width, 3, 1, "stem_conv")(x)
    else:
      x = _conv(self.stem_width, 7, 2, "stem_conv")(x)
    x = nn.relu(layers.batch_norm(train, "stem_bn")(x))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, (out, blocks) in enumerate(zip(self.stage_widths, self.inner_widths)):
      for b, inner in enumerate(blocks):
        first = b == 0
        x = ResidualBlock(
            inner=inner, out=out, stride=2 if first and s > 0 else 1,
            projection=first and self.projections[s], name=f"stage{s}_block{b}",
        )(x, train)
    return heads.task_heads(x.mean(axis=(1, 2)), self.num_classes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNetConfig(config.ModelConfig):
  """A ResNet's choices; `ResNet20Config`, `ResNet18Config`, `ResNet50Config` set them.

  Attributes:
    stage_widths: each stage's base width (a bottleneck stage's stream is 4x).
    blocks: the number of blocks in each stage (as many entries).
    width_multiplier: scales every width (rounded half up).
  """

  stem: ClassVar[str]
  expansion: ClassVar[int]
  stage_widths: Sequence[int]
  blocks: Sequence[int]
  width_multiplier: float = 1

  def __post_init__(self):
    super().__post_init__()
    blocks = config.positive_ints("blocks", self.blocks)
    self._set("blocks", blocks)
    self._set("stage_widths", config.positive_ints("stage_widths", self.stage_widths, len(blocks)))
    m = self.width_multiplier
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
      raise ValueError(f"width_multiplier must be a positive number, got {m!r}")
    if min(self._base_widths()) < 1:
      raise ValueError(f"width_multiplier {m} rounds a stage width to 0")

  def _base_widths(self) -> tuple[int, ...]:
    return tuple(spec.round_half_up(w * self.width_multiplier) for w in self.stage_widths)

  def _projections(self) -> tuple[bool, ...]:
    """Stage s's first block projects where it changes width or resolution."""
    base = self._base_widths()
    streams = [w * self.expansion for w in base]
    inputs = [base[0]] + streams[:-1]
    return tuple(s > 0 or inputs[s] != streams[s] for s in range(len(base)))

  def groups(self) -> dict[str, int]:
    base = self._base_widths()
    inner = 1 if self.expansion == 1 else 2
    out = {"stem": base[0]} if self._projections()[0] else {}
    for s, (width, blocks) in enumerate(zip(base, self.blocks)):
      out[f"stage{s}"] = width * self.expansion
      for b in range(blocks):
        out.update({f"stage{s}.block{b}.conv{j}": width for j in range(inner)})
    return out

  def permutation_spec(self, variables) -> spec.PermutationSpec:
    del variables  # The groups follow from the config alone.
    b = config.SpecBuilder(self.groups())
    inner = 1 if self.expansion == 1 else 2
    stream = "stem" if self._projections()[0] else "stage0"
    b.conv(["stem_conv"], None, stream, bias=False)
    b.norm(["stem_bn"], stream, running=True)
    for s, blocks in enumerate(self.blocks):
      for blk in range(blocks):
        name = f"stage{s}_block{blk}"
        outs = [f"stage{s}.block{blk}.conv{j}" for j in range(inner)] + [f"stage{s}"]
        previous = stream
        for j, g in enumerate(outs):
          b.conv([name, f"conv{j}"], previous, g, bias=False)
          b.norm([name, f"bn{j}"], g, running=True)
          previous = g
        if blk == 0 and self._projections()[s]:
          b.conv([name, "proj_conv"], stream, f"stage{s}", bias=False)
          b.norm([name, "proj_bn"], f"stage{s}", running=True)
        stream = f"stage{s}"
    b.heads(self.num_classes, stream)
    return b.build()

  def module(self, widths: Mapping[str, int]) -> ResNet:
    inner = 1 if self.expansion == 1 else 2
    stages = range(len(self.blocks))
    return ResNet(
        stem=self.stem,
        stem_width=widths["stem" if self._projections()[0] else "stage0"],
        stage_widths=tuple(widths[f"stage{s}"] for s in stages),
        inner_widths=tuple(
            tuple(
                tuple(widths[f"stage{s}.block{b}.conv{j}"] for j in range(inner))
                for b in range(self.blocks[s])
            )
            for s in stages
        ),
        projections=self._projections(),
        num_classes=self.num_classes,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNet20Config(ResNetConfig):
  """`models.build("resnet20", width_multiplier=1, num_classes=10)`: 0.27M parameters."""

  name = "resnet20"
  stem = "cifar"
  expansion = 1
  stage_widths: Sequence[int] = (16, 32, 64)
  blocks: Sequence[int] = (3, 3, 3)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNet18Config(ResNetConfig):
  """`models.build("resnet18", num_classes=1000)`: 11,689,512 parameters."""

  name = "resnet18"
  stem = "imagenet"
  expansion = 1
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  blocks: Sequence[int] = (2, 2, 2, 2)
  num_classes: int | Sequence[int] = 1000


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNet50Config(ResNetConfig):
  """`models.build("resnet50", num_classes=1000)`: 25,557,032 parameters."""

  name = "resnet50"
  stem = "imagenet"
  expansion = 4
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  blocks: Sequence[int] = (3, 4, 6, 3)
  num_classes: int | Sequence[int] = 1000
