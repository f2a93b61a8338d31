"""torchvision's ResNets <-> the zoo's `resnet18` and `resnet50`.

Two converters, one per block type: `torchvision_resnet18` (BasicBlock:
ResNet-18 and -34, zoo `resnet18` with `blocks=(3, 4, 6, 3)` for -34) and
`torchvision_resnet50` (Bottleneck, stride on the 3x3 convolution, "v1.5":
ResNet-50, -101, -152). The zoo's ResNets are torchvision's architecture
(7x7 stride-2 stem, 3x3 stride-2 max pool, BatchNorm eps 1e-5, a projection
shortcut where a stage changes width or resolution); only names and layouts
change:

  conv1, bn1                        -> stem_conv, stem_bn
  layer{s+1}.{b}.conv{j+1}, .bn{j+1} -> stage{s}_block{b}/conv{j}, bn{j}
  layer{s+1}.{b}.downsample.0, .1    -> stage{s}_block{b}/proj_conv, proj_bn
  fc                                -> head

Convolutions OIHW -> HWIO; `fc.weight` is transposed; BatchNorm's weight and
bias go to `params` (scale, bias), running_mean and running_var to
`batch_stats` (mean, var). `num_batches_tracked` is neither read nor written:
torch's BatchNorm fills it in when a state dict without it is loaded, also
with `strict=True`. torchvision has no config file: `infer_config` reads the
depths and widths from the shapes (widths need not be torchvision's, so
narrow test models convert too) and ignores `library_config`. Wide ResNets
and ResNeXt (inner widths other than the stage's base width, grouped
convolutions) are refused by the shape check, naming the tensors.
"""

from collections.abc import Mapping
from typing import Any

from mergejax.io.convert import vision_table
from mergejax.io.convert.base import Converter
from mergejax.models import zoo

_BLOCK = {"resnet18": "BasicBlock", "resnet50": "Bottleneck"}


def _is_batch_counter(name: str) -> bool:
  return name.endswith(".num_batches_tracked")


def table(zoo_name: str, kwargs: Mapping[str, Any]) -> list[vision_table.Entry]:
  """The layers of torchvision's ResNet for the zoo model `zoo_name(**kwargs)`."""
  cfg = zoo.config(zoo_name, **kwargs)
  if not isinstance(cfg.num_classes, int):
    raise ValueError(f"torchvision's ResNet has one head (fc); got num_classes={cfg.num_classes}")
  model = cfg.module(cfg.groups())
  Entry = vision_table.Entry
  out = [Entry("conv", ("conv1.weight",), ("stem_conv",), (model.stem_width, 3, 7, 7)),
         Entry("batch_norm", _bn("bn1"), ("stem_bn",), (model.stem_width,))]
  kernels = (3, 3) if cfg.expansion == 1 else (1, 3, 1)
  stream = model.stem_width
  for s, (width, blocks) in enumerate(zip(model.stage_widths, model.inner_widths)):
    for b, inner in enumerate(blocks):
      lib, path = f"layer{s + 1}.{b}", f"stage{s}_block{b}"
      previous = stream
      for j, (w, k) in enumerate(zip(inner + (width,), kernels)):
        out.append(Entry("conv", (f"{lib}.conv{j + 1}.weight",), (path, f"conv{j}"), (w, previous, k, k)))
        out.append(Entry("batch_norm", _bn(f"{lib}.bn{j + 1}"), (path, f"bn{j}"), (w,)))
        previous = w
      if b == 0 and model.projections[s]:
        out.append(Entry("conv", (f"{lib}.downsample.0.weight",), (path, "proj_conv"), (width, stream, 1, 1)))
        out.append(Entry("batch_norm", _bn(f"{lib}.downsample.1"), (path, "proj_bn"), (width,)))
      stream = width
  out.append(Entry("dense", ("fc.weight", "fc.bias"), ("head",), (cfg.num_classes, stream)))
  return out


def _bn(prefix: str) -> tuple[str, ...]:
  return tuple(f"{prefix}.{leaf}" for leaf in ("weight", "bias", "running_mean", "running_var"))


def _converter(zoo_name: str) -> Converter:
  where = f"torchvision {_BLOCK[zoo_name]} ResNet state dict"

  def infer_config(state: Mapping[str, Any], library_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Depths, stage widths and classes from the shapes; `library_config` is not used."""
    del library_config  # torchvision has no config beyond the architecture's name.
    bottleneck = "layer1.0.conv3.weight" in state
    if bottleneck != (zoo_name == "resnet50"):
      other = "torchvision_resnet50" if bottleneck else "torchvision_resnet18"
      found = "Bottleneck" if bottleneck else "BasicBlock"
      raise ValueError(f"{where}: the blocks are {found} (layer1.0.conv3.weight is "
                       f"{'present' if bottleneck else 'absent'}); use the converter {other!r}")
    last_bn = "bn3" if bottleneck else "bn2"
    blocks, widths = [], []
    for s in range(1, 5):
      vision_table.shape(state, f"layer{s}.0.conv1.weight", where)
      blocks.append(sum(1 for name in state if name.startswith(f"layer{s}.") and name.endswith(".conv1.weight")))
      widths.append(vision_table.shape(state, f"layer{s}.0.{last_bn}.weight", where)[0] // (4 if bottleneck else 1))
    return {"stage_widths": tuple(widths), "blocks": tuple(blocks),
            "num_classes": vision_table.shape(state, "fc.weight", where)[0]}

  def expected_shapes(kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter and running statistic (not `num_batches_tracked`) -> shape."""
    return vision_table.expected_shapes(table(zoo_name, kwargs))

  def to_variables(state: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """{"params": ..., "batch_stats": ...} of `models.build(zoo_name, **kwargs)`."""
    return vision_table.to_variables(table(zoo_name, kwargs), state, where=where, ignore=_is_batch_counter)

  def from_variables(variables: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """torchvision's state dict, without `num_batches_tracked`."""
    return vision_table.from_variables(table(zoo_name, kwargs), variables, where=f"{zoo_name} variables")

  return Converter(zoo_name, infer_config, expected_shapes, to_variables, from_variables)


RESNET18 = _converter("resnet18")
RESNET50 = _converter("resnet50")
