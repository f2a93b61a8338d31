"""Tests for the vision converters (mergejax.io.convert: torchvision ResNet, timm ViT, OpenCLIP ViT).

The oracles are the libraries themselves, through fixtures that
tools/torch_fixtures/build.py wrote with torchvision, timm and open_clip
(`make torch-fixtures`; versions in tests/fixtures/torch/versions.json): each
tiny random-init model's state dict, its eval-mode output on a fixed input,
and, for full-size models, every tensor name and shape. torch is not needed
here. The layout changes are also checked one by one against NumPy.
"""

import functools
import json
import pathlib
from typing import NamedTuple

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from mergejax import models
from mergejax import trace
from mergejax.io.convert import CONVERTERS
from mergejax.io.convert import torch_layouts

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "torch"
# fixture name -> converter name.
MODELS = {
    "torchvision_resnet18": "torchvision_resnet18",
    "torchvision_resnet50": "torchvision_resnet50",
    "timm_vit": "timm_vit",
    "timm_vit_clip_quickgelu": "timm_vit",
    "open_clip_vit": "open_clip_vit",
    "open_clip_vit_quickgelu": "open_clip_vit",
}


class Fixture(NamedTuple):
  state: dict[str, np.ndarray]
  library_config: dict | None
  x: np.ndarray  # f32[batch, h, w, 3], the recorded NCHW input in the zoo's NHWC
  output: np.ndarray


@functools.cache
def fixture(name: str) -> Fixture:
  recorded = np.load(FIXTURES / f"{name}.npz")
  meta = json.loads((FIXTURES / f"{name}.json").read_text())
  return Fixture(load_file(FIXTURES / f"{name}.safetensors"), meta["library_config"],
                 np.transpose(recorded["input"], (0, 2, 3, 1)), recorded["output"])


@functools.cache
def converted(name: str):
  """(converter, zoo kwargs, variables, zoo output on the recorded input) of a fixture."""
  conv, fx = CONVERTERS[MODELS[name]], fixture(name)
  kwargs = conv.infer_config(fx.state, fx.library_config)
  variables = conv.to_variables(fx.state, kwargs)
  return conv, kwargs, variables, _apply(conv.zoo_name, kwargs, variables, fx.x)


def _apply(zoo_name, kwargs, variables, x):
  """The ResNets jitted (one compilation each); the ViTs op by op, as they share every op's shapes."""
  model = models.build(zoo_name, **kwargs)
  apply = lambda v, x: model.apply(v, x, train=False)
  return np.asarray((jax.jit(apply) if zoo_name.startswith("resnet") else apply)(variables, x))


def _relative_error(a, b) -> float:
  """max |a - b| / max |b|."""
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


# --- Each layout change against NumPy, and its inverse exactly.

def test_conv_kernel_computes_the_same_convolution_and_round_trips():
  rng = np.random.default_rng(0)
  weight = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)  # OIHW
  x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)  # NCHW
  patches = x.reshape(2, 3, 2, 2, 2, 2)  # n, c, i, u, j, v: stride 2, 2x2 kernel
  torch_out = np.einsum("ocuv,nciujv->noij", weight, patches)
  kernel = torch_layouts.to_conv_kernel(weight)
  assert kernel.shape == (2, 2, 3, 5)
  flax_out = np.einsum("uvco,niujvc->nijo", kernel, np.transpose(patches, (0, 2, 3, 4, 5, 1)))
  np.testing.assert_allclose(np.transpose(flax_out, (0, 3, 1, 2)), torch_out, rtol=1e-6, atol=1e-6)
  back = torch_layouts.from_conv_kernel(kernel)
  assert back.flags.c_contiguous and back.dtype == weight.dtype
  np.testing.assert_array_equal(back, weight)


def test_dense_kernel_computes_the_same_linear_map_and_round_trips():
  rng = np.random.default_rng(1)
  weight, x = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
  kernel = torch_layouts.to_dense_kernel(weight)
  np.testing.assert_allclose(x @ kernel, x @ weight.T)
  np.testing.assert_array_equal(torch_layouts.from_dense_kernel(kernel), weight)


def test_attention_split_computes_torch_attention_and_round_trips():
  """PyTorch's fused q | k | v (head-major) against Flax's per-projection kernels."""
  rng = np.random.default_rng(2)
  heads, head_dim, embed, tokens = 3, 2, 4, 5
  qkv_w, qkv_b = rng.standard_normal((3 * heads * head_dim, embed)), rng.standard_normal(3 * heads * head_dim)
  out_w, out_b = rng.standard_normal((embed, heads * head_dim)), rng.standard_normal(embed)
  x = rng.standard_normal((tokens, embed))

  def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  q, k, v = np.split(x @ qkv_w.T + qkv_b, 3, axis=-1)  # torch: then view(t, heads, head_dim)
  q, k, v = (a.reshape(tokens, heads, head_dim).transpose(1, 0, 2) for a in (q, k, v))
  torch_out = (softmax(q @ k.transpose(0, 2, 1) / np.sqrt(head_dim)) @ v).transpose(1, 0, 2)
  torch_out = torch_out.reshape(tokens, -1) @ out_w.T + out_b

  a = torch_layouts.to_attention(qkv_w, qkv_b, out_w, out_b, num_heads=heads)
  fq, fk, fv = (np.einsum("te,ehd->thd", x, a[n]["kernel"]) + a[n]["bias"] for n in ("query", "key", "value"))
  weights = softmax(np.einsum("qhd,khd->hqk", fq, fk) / np.sqrt(head_dim))
  flax_out = np.einsum("hqk,khd,hde->qe", weights, fv, a["out"]["kernel"]) + a["out"]["bias"]
  np.testing.assert_allclose(flax_out, torch_out, rtol=1e-10)
  for got, want in zip(torch_layouts.from_attention(a), (qkv_w, qkv_b, out_w, out_b)):
    np.testing.assert_array_equal(got, want)


# --- Each library's model: outputs, and the way back.

@pytest.mark.parametrize("name", MODELS)
def test_import_reproduces_the_library_outputs(name):
  *_, output = converted(name)
  assert _relative_error(output, fixture(name).output) <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_export_round_trips_bit_exactly(name):
  conv, kwargs, variables, _ = converted(name)
  state = fixture(name).state
  back = conv.from_variables(variables, kwargs)
  counters = {k for k in state if k.endswith(".num_batches_tracked")}
  assert set(back) == set(state) - counters
  for key, value in back.items():
    assert value.dtype == state[key].dtype and value.shape == state[key].shape, key
    np.testing.assert_array_equal(value, state[key], err_msg=key)
  if "resnet" in name:  # BatchNorm: statistics in batch_stats, counters neither read nor written.
    assert counters and {k.rsplit(".", 1)[0] + ".running_var" for k in counters} <= set(back)
    np.testing.assert_array_equal(variables["batch_stats"]["stem_bn"]["var"], state["bn1.running_var"])


def test_the_shapes_cannot_say_the_activation_or_the_head_count_and_the_outputs_notice():
  """The fixtures are sensitive to what library_config supplies: wrong values miss the outputs."""
  for name, config in (("open_clip_vit_quickgelu", {**fixture("open_clip_vit_quickgelu").library_config,
                                                   "quick_gelu": False}),
                       ("timm_vit", {"num_heads": 2})):
    conv, fx = CONVERTERS[MODELS[name]], fixture(name)
    kwargs = conv.infer_config(fx.state, config)
    output = _apply("vit", kwargs, conv.to_variables(fx.state, kwargs), fx.x)
    assert _relative_error(output, fx.output) > 1e-3, name  # 10x the tolerance


def test_converted_vit_options_keep_the_hand_spec_valid_and_equal_to_the_traced_one():
  """OpenCLIP's layout (ln_pre, no patch or head bias, QuickGELU): the hand spec is the traced one.

  (tests/test_trace.py shows that permutations from traced specs keep a model's outputs.)
  """
  conv, kwargs, variables, output = converted("open_clip_vit_quickgelu")
  hand = models.permutation_spec("vit", variables, **kwargs)
  model = models.build("vit", **kwargs)
  traced = trace.permutation_spec(model.apply, variables, fixture("open_clip_vit_quickgelu").x)
  assert {(traced.sizes[g], frozenset(r)) for g, r in traced.groups.items()} == {
      (hand.sizes[g], frozenset(r)) for g, r in hand.groups.items()}
  assert ("params", "ln_pre", "scale") in {r.path for r in hand.groups["embed"]}
  assert set(models.config("vit", **kwargs).fixed_groups()) == {
      g for g in hand.sizes if g.endswith(("qk_dim", "vo_dim"))}


# --- Full-size models: every name and shape, without weights.

class _Shape(NamedTuple):
  shape: tuple[int, ...]


def _full(name: str) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v) for k, v in json.loads((FIXTURES / f"{name}.shapes.json").read_text()).items()}


VIT_B = dict(embed_dim=768, depth=12, num_heads=12, head_dim=64, mlp_dim=(3072,) * 12, image_size=224)


@pytest.mark.parametrize("shapes,converter,kwargs", [
    ("torchvision_resnet50", "torchvision_resnet50", {}),
    ("torchvision_resnet18", "torchvision_resnet18", {}),
    ("timm_vit_base_patch16_224", "timm_vit", dict(
        VIT_B, patch_size=16, num_classes=1000, ln_pre=False, layer_norm_epsilon=1e-6, activation="gelu",
        patch_bias=True, head_bias=True)),
    ("open_clip_vit_b_32", "open_clip_vit", dict(
        VIT_B, patch_size=32, num_classes=512, ln_pre=True, layer_norm_epsilon=1e-5, activation="gelu",
        patch_bias=False, head_bias=False)),
])
def test_expected_shapes_are_the_full_size_library_models(shapes, converter, kwargs):
  full = _full(shapes)
  conv = CONVERTERS[converter]
  counters = {k for k in full if k.endswith(".num_batches_tracked")}
  assert conv.expected_shapes(kwargs) == {k: v for k, v in full.items() if k not in counters}
  assert all(full[k] == () for k in counters)
  state = {k: _Shape(v) for k, v in full.items()}
  inferred = conv.infer_config(state, None)
  assert conv.expected_shapes(inferred) == conv.expected_shapes(kwargs)
  if kwargs:
    assert {k: inferred[k] for k in kwargs} == kwargs
  else:
    assert models.config(conv.zoo_name, **inferred).groups() == models.config(conv.zoo_name).groups()


# --- Errors name what is wrong, before anything is converted.

def test_a_missing_extra_or_misshapen_tensor_is_named():
  conv, kwargs, *_ = converted("timm_vit")
  state = dict(fixture("timm_vit").state)
  del state["blocks.1.attn.qkv.bias"]
  state["blocks.0.ls1.gamma"] = np.ones(32, np.float32)
  state["head.weight"] = np.zeros((5, 31), np.float32)
  with pytest.raises(ValueError) as error:
    conv.to_variables(state, kwargs)
  message = str(error.value)
  for text in ("missing keys ['blocks.1.attn.qkv.bias']", "unexpected keys ['blocks.0.ls1.gamma']",
               "head.weight: (5, 31), expected (5, 32)"):
    assert text in message


def test_a_resnet_of_the_other_block_type_or_a_wide_resnet_is_refused():
  bottleneck = fixture("torchvision_resnet50").state
  with pytest.raises(ValueError, match="Bottleneck.*use the converter 'torchvision_resnet50'"):
    CONVERTERS["torchvision_resnet18"].infer_config(bottleneck, None)
  conv = CONVERTERS["torchvision_resnet50"]
  wide = {k: _Shape(v) for k, v in _full("torchvision_resnet50").items()}
  wide["layer1.0.conv1.weight"] = _Shape((128, 64, 1, 1))  # wide_resnet50_2's inner width
  with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: \(128, 64, 1, 1\), expected \(64, 64, 1, 1\)"):
    conv.to_variables(wide, conv.infer_config(wide, None))
  with pytest.raises(ValueError, match="missing key 'fc.weight'"):
    conv.infer_config({k: v for k, v in bottleneck.items() if k != "fc.weight"}, None)


def test_variables_that_do_not_fit_the_table_are_named():
  conv, kwargs, variables, _ = converted("torchvision_resnet18")
  params = {**variables["params"], "extra": {"kernel": np.zeros(3)}}
  del params["head"]
  with pytest.raises(ValueError, match=r"missing leaves \['params/head/bias', 'params/head/kernel'\];"
                                       r" leaves no tensor is written from \['params/extra/kernel'\]"):
    conv.from_variables({**variables, "params": params}, kwargs)
  with pytest.raises(ValueError, match=r"fc.weight: \(5, 32\), expected \(5, 3\)"):
    conv.from_variables(variables, {**kwargs, "stage_widths": (4, 8, 16, 3)})


def test_library_configs_the_zoo_cannot_follow_are_refused():
  state = fixture("open_clip_vit").state
  with pytest.raises(ValueError, match="pool_type='avg' is not supported"):
    CONVERTERS["open_clip_vit"].infer_config(state, {"vision_cfg": {"pool_type": "avg"}})
  with pytest.raises(ValueError, match=r"unknown keys \['eps'\]"):
    CONVERTERS["timm_vit"].infer_config(fixture("timm_vit").state, {"eps": 1e-5})
  with pytest.raises(ValueError, match="embed_dim 32 is not 64-unit heads"):
    CONVERTERS["timm_vit"].infer_config(fixture("timm_vit").state, None)
  kwargs = converted("open_clip_vit")[1]
  with pytest.raises(ValueError, match="need image_size"):
    CONVERTERS["open_clip_vit"].expected_shapes({**kwargs, "image_size": None})


def test_vit_options_are_checked():
  for options, message in (({"activation": "relu"}, "activation must be one of gelu, gelu_tanh, quick_gelu"),
                           ({"layer_norm_epsilon": 0}, "layer_norm_epsilon must be a positive number"),
                           ({"ln_pre": 1}, "ln_pre must be a bool"),
                           ({"image_size": 30, "patch_size": 4}, "patch_size 4 does not divide image_size 30")):
    with pytest.raises(ValueError, match=message):
      models.config("vit", **options)
  model = models.build("vit", image_size=8, patch_size=4, depth=1)
  with pytest.raises(ValueError, match="built for 8x8 images, got a 12x12 input"):
    model.init(jax.random.key(0), np.zeros((1, 12, 12, 3), np.float32))
