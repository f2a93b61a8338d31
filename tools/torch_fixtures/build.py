"""Builds the fixtures of tests/test_convert_vision.py with torchvision, timm and open_clip.

    make torch-fixtures        # .venv-fixtures from requirements*.txt, then this script

Runs in its own venv (torch's CPU build; torchvision, timm and open_clip_torch
installed with --no-deps, since their releases pull a CUDA torch), never in
mergejax's. For every family it builds tiny random-init models through the
library's own constructors (reduced widths and depths), and writes into the
output directory, for each fixture NAME:

  NAME.safetensors   the model's state dict (torch's names and layouts)
  NAME.npz           `input` (f32[batch, 3, h, w], NCHW) and `output`, the
                     model's eval-mode output on it (logits or image features)
  NAME.json          how it was built, and `library_config`, what the
                     converter's `infer_config` is given

and, for full-size models, `NAME.shapes.json` (tensor name -> shape, built on
torch's meta device: names and shapes only, no weights), plus
`versions.json` with the library versions. Everything is seeded.
"""

import argparse
import json
import pathlib
import platform

import numpy as np
import safetensors.torch
import torch

# torchvision's PyPI wheels are CUDA builds whose C ops cannot load against
# torch's CPU build; its models are pure Python, but its meta registrations
# register fake kernels for two of those ops unconditionally. Declaring the
# two schemas lets `import torchvision` succeed (nothing here calls them).
_TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
  _TORCHVISION_OPS.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import open_clip  # noqa: E402  (after the schemas above)
import timm  # noqa: E402
import torchvision  # noqa: E402
from torchvision.models import resnet as tv_resnet  # noqa: E402

BATCH = 2


class NarrowResNet(tv_resnet.ResNet):
  """torchvision's ResNet with every width divided by `divisor`.

  torchvision hard-codes the widths 64, 128, 256, 512; the blocks,
  `_make_layer`, the initialisation and `forward` stay torchvision's. The
  stem is rebuilt at the narrow width, and layer1 is made from it.
  """

  def __init__(self, block, layers, *, divisor: int, num_classes: int):
    self.divisor = divisor
    super().__init__(block, layers, num_classes=num_classes)
    stem = 64 // divisor
    self.conv1 = torch.nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(stem)
    self.fc = torch.nn.Linear(512 // divisor * block.expansion, num_classes)
    torch.nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

  def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
    if planes == 64:  # layer1 reads the stem, narrowed as well.
      self.inplanes = 64 // self.divisor
    return super()._make_layer(block, planes // self.divisor, blocks, stride, dilate)


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Makes every norm, bias and embedding informative (libraries init them to 1, 0 or ~0).

  Norm scales and running variances ~ U(0.5, 1.5); biases, running means,
  class tokens and position embeddings ~ N(0, 0.1); matrices (Linear, fused
  q | k | v) ~ N(0, 1 / fan_in), so that attention is far from uniform and
  the MLPs' activations reach where GELU and QuickGELU differ (timm's 0.02
  init leaves both near 0). Convolutions keep the library's init.
  """
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point():
        continue
      leaf = name.rsplit(".", 1)[-1]
      is_norm = any(part.startswith(("bn", "norm", "ln")) for part in name.split(".")) or (
          ".downsample.1." in name)
      if leaf == "running_var" or (is_norm and leaf == "weight"):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
      elif tensor.ndim <= 1 or leaf in ("cls_token", "pos_embed", "positional_embedding"):
        tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
      elif tensor.ndim == 2:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) / tensor.shape[1] ** 0.5)


def write_model(out: pathlib.Path, name: str, model: torch.nn.Module, image_size: int, built: dict,
                library_config: dict | None, seed: int) -> None:
  """Writes NAME.safetensors, NAME.npz and NAME.json for one eval-mode model."""
  generator = torch.Generator().manual_seed(seed)
  randomize(model, generator)
  model.eval()
  x = torch.randn((BATCH, 3, image_size, image_size), generator=generator)
  with torch.no_grad():
    y = model(x)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  safetensors.torch.save_file(state, out / f"{name}.safetensors")
  np.savez(out / f"{name}.npz", input=x.numpy(), output=y.numpy())
  (out / f"{name}.json").write_text(json.dumps(
      {"built": built, "library_config": library_config}, indent=1, sort_keys=True) + "\n")
  print(f"{name}: {sum(v.numel() for v in state.values())} numbers, output {tuple(y.shape)}")


def write_shapes(out: pathlib.Path, name: str, make) -> None:
  """Writes NAME.shapes.json: every tensor of the full-size model, built on the meta device."""
  with torch.device("meta"):
    model = make()
  shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
  (out / f"{name}.shapes.json").write_text(json.dumps(shapes, indent=0) + "\n")
  print(f"{name}.shapes.json: {len(shapes)} tensors")


def check_loads_without_batch_counters(model: torch.nn.Module) -> None:
  """torch fills in BatchNorm's `num_batches_tracked` when a state dict lacks it (strict loading).

  The converters neither read nor write those counters; this is why a
  written-back state dict still loads into torchvision.
  """
  state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
  type(model).load_state_dict(model, state, strict=True)


def build_torchvision(out: pathlib.Path) -> None:
  for name, block, layers, seed in (
      ("torchvision_resnet18", tv_resnet.BasicBlock, [2, 1, 1, 1], 0),
      ("torchvision_resnet50", tv_resnet.Bottleneck, [2, 1, 1, 1], 1),
  ):
    torch.manual_seed(seed)
    model = NarrowResNet(block, layers, divisor=16, num_classes=5)
    check_loads_without_batch_counters(model)
    built = {"class": "torchvision.models.resnet.ResNet, widths / 16 (NarrowResNet)",
             "block": block.__name__, "layers": layers, "num_classes": 5}
    write_model(out, name, model, 64, built, None, seed)
  write_shapes(out, "torchvision_resnet50", torchvision.models.resnet50)
  write_shapes(out, "torchvision_resnet18", torchvision.models.resnet18)


def build_timm(out: pathlib.Path) -> None:
  tiny = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=5)
  for name, arch, library_config, seed in (
      ("timm_vit", "vit_tiny_patch16_224", {"num_heads": 4}, 2),
      ("timm_vit_clip_quickgelu", "vit_base_patch32_clip_quickgelu_224",
       {"num_heads": 4, "activation": "quick_gelu"}, 3),
  ):
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **tiny)
    write_model(out, name, model, 32, {"timm.create_model": arch, **tiny}, library_config, seed)
  write_shapes(out, "timm_vit_base_patch16_224",
               lambda: timm.create_model("vit_base_patch16_224", pretrained=False))


def build_open_clip(out: pathlib.Path) -> None:
  vision_cfg = dict(image_size=32, patch_size=8, width=32, head_width=8, layers=2, mlp_ratio=2.0)
  for name, quick_gelu, seed in (("open_clip_vit", False, 4), ("open_clip_vit_quickgelu", True, 5)):
    torch.manual_seed(seed)
    model = open_clip.model._build_vision_tower(16, open_clip.model.CLIPVisionCfg(**vision_cfg), quick_gelu)
    library_config = {"embed_dim": 16, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg}
    built = {"open_clip.model._build_vision_tower": library_config}
    write_model(out, name, model, 32, built, library_config, seed)
  b32 = open_clip.get_model_config("ViT-B-32")
  write_shapes(out, "open_clip_vit_b_32", lambda: open_clip.model._build_vision_tower(
      b32["embed_dim"], open_clip.model.CLIPVisionCfg(**b32["vision_cfg"])))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tests/fixtures/torch"))
  out = parser.parse_args().out
  out.mkdir(parents=True, exist_ok=True)
  torch.use_deterministic_algorithms(True)
  build_torchvision(out)
  build_timm(out)
  build_open_clip(out)
  versions = {"python": platform.python_version(), "torch": torch.__version__,
              "torchvision": torchvision.__version__, "timm": timm.__version__,
              "open_clip_torch": open_clip.__version__, "numpy": np.__version__,
              "safetensors": safetensors.__version__}
  (out / "versions.json").write_text(json.dumps(versions, indent=1, sort_keys=True) + "\n")
  print("versions:", versions)


if __name__ == "__main__":
  main()
