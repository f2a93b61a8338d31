"""Tests for mergejax.models: the zoo at any widths of a MergeLayout.

Parameter counts are checked against closed forms written out here, layer by
layer, independently of the modules.
"""

import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import models
from mergejax import permute
from mergejax import tree as tree_lib
from mergejax.spec import AxisRef, MergeLayout, PermutationSpec, check_spec

DIGITS = (8, 8, 1)
RGB = (32, 32, 3)


def _param_count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _heads(d: int, num_classes) -> int:
  classes = num_classes if isinstance(num_classes, tuple) else (num_classes,)
  return sum((d + 1) * c for c in classes)


def _mlp_count(input_shape, features, num_classes=10) -> int:
  widths = (math.prod(input_shape), *features)
  return sum((a + 1) * b for a, b in zip(widths, widths[1:])) + _heads(widths[-1], num_classes)


def _vgg_count(input_shape, features, dense, batch_norm, num_classes=10) -> int:
  h, w, c = input_shape
  total = 0
  for f in features:
    if f == "M":
      h, w = h // 2, w // 2
    else:
      total += 9 * c * f + 2 * f if batch_norm else 9 * c * f + f
      c = f
  widths = (h * w * c, *dense)
  total += sum((a + 1) * b for a, b in zip(widths, widths[1:]))
  return total + _heads(widths[-1], num_classes)


def _resnet_count(input_shape, stage_widths, blocks, stem, bottleneck, num_classes=10) -> int:
  def conv_bn(k, cin, cout):
    return k * k * cin * cout + 2 * cout

  stem_width = stage_widths[0]
  total = conv_bn(3 if stem == "cifar" else 7, input_shape[-1], stem_width)
  c = stem_width
  for s, (w, n) in enumerate(zip(stage_widths, blocks)):
    out = 4 * w if bottleneck else w
    for b in range(n):
      if bottleneck:
        total += conv_bn(1, c, w) + conv_bn(3, w, w) + conv_bn(1, w, out)
      else:
        total += conv_bn(3, c, w) + conv_bn(3, w, out)
      if b == 0 and (s > 0 or c != out):
        total += conv_bn(1, c, out)
      c = out
  return total + _heads(c, num_classes)


def _vit_count(input_shape, patch_size, embed_dim, num_heads, head_dim, mlp_dims, num_classes=10):
  h, w, c = input_shape
  d = embed_dim
  tokens = (h // patch_size) * (w // patch_size) + 1
  total = patch_size**2 * c * d + d + d + tokens * d  # patch conv, class token, positions
  for heads, m in zip(num_heads, mlp_dims):
    inner = heads * head_dim
    total += 2 * (2 * d)  # two LayerNorms
    total += 3 * (d * inner + inner) + inner * d + d  # q, k, v, out
    total += d * m + m + m * d + d
  return total + 2 * d + _heads(d, num_classes)


# (model, config, input shape, closed-form count): two width settings per model.
WIDTH_SETTINGS = [
    ("mlp", dict(features=(16,)), DIGITS, _mlp_count(DIGITS, (16,))),
    ("mlp", dict(features=(24, 12, 8)), DIGITS, _mlp_count(DIGITS, (24, 12, 8))),
    ("vgg", dict(features=(8, "M", 16), dense=(32,)), DIGITS,
     _vgg_count(DIGITS, (8, "M", 16), (32,), True)),
    ("vgg", dict(features=(4, 6, "M", 8, "M"), dense=(), batch_norm=False), DIGITS,
     _vgg_count(DIGITS, (4, 6, "M", 8, "M"), (), False)),
    ("resnet20", dict(width_multiplier=0.25, blocks=(2, 1, 1)), DIGITS,
     _resnet_count(DIGITS, (4, 8, 16), (2, 1, 1), "cifar", False)),
    ("resnet20", dict(stage_widths=(4, 6), blocks=(1, 2)), DIGITS,
     _resnet_count(DIGITS, (4, 6), (1, 2), "cifar", False)),
    ("resnet18", dict(stage_widths=(4, 8, 8, 8), blocks=(2, 1, 1, 1), num_classes=10), RGB,
     _resnet_count(RGB, (4, 8, 8, 8), (2, 1, 1, 1), "imagenet", False)),
    ("resnet18", dict(stage_widths=(4, 6), blocks=(1, 1), num_classes=10), RGB,
     _resnet_count(RGB, (4, 6), (1, 1), "imagenet", False)),
    ("resnet50", dict(width_multiplier=1 / 32, blocks=(1, 2, 1, 1), num_classes=10), RGB,
     _resnet_count(RGB, (2, 4, 8, 16), (1, 2, 1, 1), "imagenet", True)),
    ("resnet50", dict(stage_widths=(4, 4), blocks=(1, 2), num_classes=10), RGB,
     _resnet_count(RGB, (4, 4), (1, 2), "imagenet", True)),
    ("vit", dict(patch_size=2, embed_dim=16, depth=2, num_heads=2, head_dim=4, mlp_dim=32),
     DIGITS, _vit_count(DIGITS, 2, 16, (2, 2), 4, (32, 32))),
    ("vit", dict(patch_size=4, embed_dim=8, depth=3, num_heads=(1, 2, 3), head_dim=2,
                 mlp_dim=(8, 16, 4)),
     DIGITS, _vit_count(DIGITS, 4, 8, (1, 2, 3), 2, (8, 16, 4))),
]

BATCH_NORM = {"vgg", "resnet20", "resnet18", "resnet50"}


def _init(model, input_shape, batch=2, seed=0):
  """Random variables of `model`'s shapes, and a batch of inputs.

  NumPy fills the leaves (scaled by fan-in; BatchNorm statistics at mean 0,
  variance 1): `model.init` compiles its random initialisers, which would
  dominate these tests' time without testing the zoo.
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, *input_shape), dtype=np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(seed), x)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if name == "['var']":
      return np.ones(leaf.shape, np.float32)
    if name == "['mean']":
      return np.zeros(leaf.shape, np.float32)
    fan_in = math.prod(leaf.shape[:-1]) or 1
    return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes), x


@pytest.mark.parametrize("name,config,input_shape,expected", WIDTH_SETTINGS)
def test_forward_backward_and_parameter_count(name, config, input_shape, expected):
  model = models.build(name, **config)
  variables, x = _init(model, input_shape, batch=4)
  assert _param_count(variables["params"]) == expected
  has_stats = "batch_stats" in variables
  assert has_stats == (name in BATCH_NORM and config.get("batch_norm", True))

  def loss(params):
    v = {**variables, "params": params}
    if has_stats:
      logits, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    else:
      logits = model.apply(v, x, train=True)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0]) + 0.1 * jnp.mean(logits**2)

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  assert np.isfinite(value)
  logits = jax.jit(model.apply)(variables, x)
  assert logits.shape == (4, config.get("num_classes", 10))
  # Every parameter takes part in the function: none has an all-zero gradient.
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("name,expected", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_imagenet_resnets_have_the_published_parameter_counts(name, expected):
  model = models.build(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert _param_count(shapes["params"]) == expected
  assert _resnet_count((224, 224, 3), (64, 128, 256, 512), models.config(name).blocks,
                       "imagenet", name == "resnet50", num_classes=1000) == expected


SMALL = {
    "mlp": (dict(features=(6, 5)), DIGITS),
    "vgg": (dict(features=(3, "M", 4), dense=(5,)), DIGITS),
    "resnet20": (dict(stage_widths=(2, 3, 4), blocks=(1, 2, 1)), DIGITS),
    "resnet18": (dict(stage_widths=(2, 3), blocks=(1, 1)), RGB),
    "resnet50": (dict(stage_widths=(2, 3), blocks=(2, 1)), RGB),
    "vit": (dict(patch_size=4, embed_dim=6, depth=2, num_heads=(2, 3), head_dim=2,
                 mlp_dim=(5, 4)), DIGITS),
}


def _group_axis(name: str, group: str, config) -> tuple[tuple[str, ...], int]:
  """A kernel whose output axis (path, axis) is `group`, written from the docs."""
  parts = group.split(".")
  if name == "mlp":
    return ("params", group, "kernel"), 1
  if name == "vgg":
    return ("params", group, "kernel"), 3 if group.startswith("conv") else 1
  if name.startswith("resnet"):
    if group == "stem":
      return ("params", "stem_conv", "kernel"), 3
    if len(parts) == 1:  # the stream: the last convolution of the stage's first block
      last = "conv2" if name == "resnet50" else "conv1"
      return ("params", f"{group}_block0", last, "kernel"), 3
    return ("params", f"{parts[0]}_{parts[1]}", parts[2], "kernel"), 3
  if group == "embed":
    return ("params", "patch_embed", "kernel"), 3
  block, kind = parts
  return {
      "heads": (("params", block, "attention", "query", "kernel"), 1),
      "qk_dim": (("params", block, "attention", "key", "kernel"), 2),
      "vo_dim": (("params", block, "attention", "value", "kernel"), 2),
      "mlp": (("params", block, "mlp_in", "kernel"), 1),
  }[kind]


def _shapes(model, input_shape):
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@hypothesis.settings(max_examples=12)
@hypothesis.given(st.sampled_from(sorted(SMALL)), st.data())
def test_widths_follow_the_layout(name, data):
  config, input_shape = SMALL[name]
  sizes = models.groups(name, **config)
  fixed = models.config(name, **config).fixed_groups()
  ratios = {g: 1.0 if g in fixed else data.draw(st.floats(0, 1), label=g) for g in sizes}
  layout = MergeLayout.from_ratios(sizes, ratios)
  shapes = _shapes(models.build(name, layout, **config), input_shape)
  for g, width in layout.widths().items():
    path, axis = _group_axis(name, g, config)
    assert _at(shapes, path).shape[axis] == width, (g, path)


def test_resnet_stem_joins_the_first_stage_unless_it_projects():
  for name, config, input_shape in [("resnet20", SMALL["resnet20"][0], DIGITS),
                                    ("resnet18", SMALL["resnet18"][0], RGB)]:
    sizes = models.groups(name, **config)
    assert "stem" not in sizes
    layout = MergeLayout.from_ratios(sizes, {"stage0": 0.0})
    shapes = _shapes(models.build(name, layout, **config), input_shape)
    assert shapes["params"]["stem_conv"]["kernel"].shape[3] == 2 * sizes["stage0"]
    assert "proj_conv" not in shapes["params"]["stage0_block0"]
  sizes = models.groups("resnet50", **SMALL["resnet50"][0])
  assert sizes["stem"] == 2 and sizes["stage0"] == 8
  shapes = _shapes(models.build("resnet50", **SMALL["resnet50"][0]), RGB)
  assert "proj_conv" in shapes["params"]["stage0_block0"]
  assert "proj_conv" not in shapes["params"]["stage0_block1"]


def test_mlp_parameter_count_at_merged_widths():
  sizes = models.groups("mlp", features=(10, 7))
  layout = MergeLayout({"hidden_0": (4, 6, 6), "hidden_1": (7, 0, 0)})
  shapes = _shapes(models.build("mlp", layout, features=(10, 7)), DIGITS)
  assert sizes == {"hidden_0": 10, "hidden_1": 7}
  assert _param_count(shapes["params"]) == _mlp_count(DIGITS, (16, 7))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_identity_layout_is_the_original_model(name):
  config, input_shape = SMALL[name]
  identity = MergeLayout.identity(models.groups(name, **config))
  original = models.build(name, **config)
  assert models.build(name, identity, **config) == original
  variables, x = _init(original, input_shape)
  rebuilt = models.build(name, identity, **config)
  np.testing.assert_array_equal(jax.jit(rebuilt.apply)(variables, x), jax.jit(original.apply)(variables, x))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_one_head_per_task(name):
  config, input_shape = SMALL[name]
  model = models.build(name, **{**config, "num_classes": (3, 4, 2)})
  variables, x = _init(model, input_shape, batch=5)
  outputs = jax.jit(model.apply)(variables, x)
  assert isinstance(outputs, tuple)
  assert [o.shape for o in outputs] == [(5, 3), (5, 4), (5, 2)]
  assert {"head_0", "head_1", "head_2"} <= set(variables["params"])
  assert "head" not in variables["params"]
  # The heads read the same features: one head's logits are that head alone.
  single = models.build(name, **{**config, "num_classes": 4})
  params = {k: v for k, v in variables["params"].items() if not k.startswith("head_")}
  params["head"] = variables["params"]["head_1"]
  np.testing.assert_allclose(
      jax.jit(single.apply)({**variables, "params": params}, x), outputs[1], rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize("name", ["vgg", "resnet20"])
def test_batch_stats_update_in_training_and_serve_in_eval(name):
  config, input_shape = SMALL[name]
  model = models.build(name, **config)
  x = np.random.default_rng(0).standard_normal((8, *input_shape), dtype=np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  stats = variables["batch_stats"]
  means = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(stats)
           if jax.tree_util.keystr(path).endswith("['mean']")]
  assert means and all(np.all(m == 0) for m in means)
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  _, updates = train(variables, x + 3.0)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(stats)
  for before, after in zip(jax.tree.leaves(stats), jax.tree.leaves(updates["batch_stats"])):
    assert not np.allclose(before, after)
  # Eval mode uses the running statistics: an example's output does not
  # depend on the rest of its batch.
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(variables, x[:1]), apply(variables, x)[:1], rtol=1e-5, atol=1e-5)


def test_models_without_batch_norm_have_no_batch_stats():
  for name, config in [("mlp", {}), ("vit", {"patch_size": 2}), ("vgg", {"batch_norm": False})]:
    model = models.build(name, **{**SMALL[name][0], **config})
    assert set(_shapes(model, DIGITS)) == {"params"}


def test_vit_takes_a_head_count_per_block():
  config, input_shape = SMALL["vit"]
  shapes = _shapes(models.build("vit", **config), input_shape)
  assert shapes["params"]["block0"]["attention"]["query"]["kernel"].shape == (6, 2, 2)
  assert shapes["params"]["block1"]["attention"]["query"]["kernel"].shape == (6, 3, 2)
  assert shapes["params"]["block1"]["attention"]["out"]["kernel"].shape == (3, 2, 6)
  assert models.groups("vit", **config)["block1.heads"] == 3


def test_names_and_groups():
  assert models.names() == ("mlp", "vgg", "resnet20", "resnet18", "resnet50", "vit", "lm", "moe_mlp")
  assert list(models.groups("vgg", features=(3, "M", 4), dense=(5,))) == ["conv_0", "conv_1", "dense_0"]
  assert list(models.groups("vit", depth=1)) == [
      "embed", "block0.heads", "block0.qk_dim", "block0.vo_dim", "block0.mlp"]
  r20 = models.groups("resnet20", width_multiplier=2)
  assert r20["stage0"] == 32 and r20["stage2.block2.conv0"] == 128 and len(r20) == 3 + 9
  assert len(models.groups("resnet50")) == 1 + 4 + 2 * 16


BAD_CONFIGS = [
    ("transformer", {}, "unknown model 'transformer'"),
    ("mlp", {"depth": 3}, "unknown config keys \\['depth'\\]"),
    ("mlp", {"features": (8, 0)}, "features\\[1\\] must be a positive int"),
    ("mlp", {"features": 8}, "features must be a sequence"),
    ("mlp", {"num_classes": 0}, "num_classes"),
    ("mlp", {"num_classes": ()}, "num_classes"),
    ("vgg", {"features": ("M", "M")}, "at least one convolution"),
    ("vgg", {"features": (8, "X")}, "features\\[1\\]"),
    ("resnet20", {"stage_widths": (16, 32)}, "stage_widths has 2 entries, expected 3"),
    ("resnet50", {"blocks": (3, 4, 6)}, "stage_widths has 4 entries, expected 3"),
    ("resnet20", {"width_multiplier": 0}, "width_multiplier"),
    ("resnet20", {"width_multiplier": 0.01}, "rounds a stage width to 0"),
    ("vit", {"depth": 3, "num_heads": (2, 2)}, "num_heads has 2 entries, expected 3"),
    ("vit", {"depth": 2, "mlp_dim": (8, 8, 8)}, "mlp_dim has 3 entries, expected 2"),
    ("vit", {"head_dim": 0}, "head_dim must be a positive int"),
]


@pytest.mark.parametrize("name,config,message", BAD_CONFIGS)
def test_bad_configs_are_refused(name, config, message):
  with pytest.raises(ValueError, match=message):
    models.build(name, **config)


def test_layouts_that_do_not_fit_are_refused():
  sizes = models.groups("mlp", features=(4, 3))
  with pytest.raises(ValueError, match=r"missing \['hidden_1'\]"):
    models.build("mlp", {"hidden_0": (4, 0, 0)}, features=(4, 3))
  with pytest.raises(ValueError, match=r"unknown \['hidden_2'\]"):
    models.build("mlp", {**MergeLayout.identity(sizes), "hidden_2": (1, 0, 0)}, features=(4, 3))
  with pytest.raises(ValueError, match="'hidden_0' has 4 units but its layout \\(2, 2, 1\\)"):
    models.build("mlp", {"hidden_0": (2, 2, 1), "hidden_1": (3, 0, 0)}, features=(4, 3))
  vit = models.groups("vit", depth=1, head_dim=4)
  widened = {**MergeLayout.identity(vit), "block0.qk_dim": (2, 2, 2)}
  with pytest.raises(ValueError, match="'block0.qk_dim' is never widened"):
    models.build("vit", widened, depth=1, head_dim=4)
  heads = {**MergeLayout.identity(vit), "block0.heads": (2, 2, 2)}
  assert models.build("vit", heads, depth=1, head_dim=4).num_heads == (6,)


@pytest.mark.parametrize("name,input_shape,message", [
    ("vgg", (8, 8), "expects images"),
    ("resnet20", (64,), "expects images"),
    ("vit", (6, 6, 1), "patch_size 4 does not divide"),
    ("vgg", (4, 4, 1), "too small for 3 max pools"),
])
def test_bad_inputs_are_refused(name, input_shape, message):
  model = models.build(name, **({"features": (2, "M", 2, "M", 2, "M")} if name == "vgg" else {}))
  with pytest.raises(ValueError, match=message):
    _shapes(model, input_shape)


# Hand-written permutation specs: they fit, they name exactly the zoo's
# groups, a random permutation drawn from them keeps every output (BatchNorm
# in eval mode with non-trivial running statistics), and permuting a single
# axis of any group alone changes the outputs.


SPEC_MODELS = [
    ("mlp", dict(features=(6, 5)), DIGITS),
    ("mlp", dict(features=(6, 1, 5), num_classes=(3, 4)), DIGITS),  # a size-1 group
    ("vgg", dict(features=(3, "M", 4), dense=(5,)), DIGITS),  # flatten of 4x4 positions
    ("vgg", dict(features=(3, "M", 4), dense=(), num_classes=(3, 4)), DIGITS),  # heads read the flatten
    ("vgg", dict(features=(2, "M", 3, "M", 4, "M"), dense=(5,), batch_norm=False), DIGITS),  # 1x1
    ("resnet20", dict(stage_widths=(2, 3, 4), blocks=(1, 2, 1)), DIGITS),
    ("resnet18", dict(stage_widths=(2, 3), blocks=(1, 1), num_classes=(3, 4)), RGB),
    ("resnet50", dict(stage_widths=(2, 3), blocks=(2, 1)), RGB),  # bottlenecks, a stem group
    ("vit", dict(patch_size=4, embed_dim=6, depth=2, num_heads=(2, 3), head_dim=2, mlp_dim=(5, 4)),
     DIGITS),
    ("vit", dict(patch_size=4, embed_dim=6, depth=2, num_heads=(1, 3), head_dim=3, mlp_dim=4,
                 num_classes=(3, 4)), DIGITS),
]


def _random_stats(variables, seed=1):
  """Non-trivial BatchNorm running statistics: any mean, positive var."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if name == "['var']":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name == "['mean']":
      return rng.standard_normal(leaf.shape).astype(np.float32)
    return leaf

  return jax.tree_util.tree_map_with_path(fill, variables)


def _outputs_differ(a, b) -> bool:
  return any(not np.allclose(x, y, rtol=1e-4, atol=1e-4) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name,config,input_shape", SPEC_MODELS)
def test_hand_spec_keeps_the_function(name, config, input_shape):
  model = models.build(name, **config)
  variables, x = _init(model, input_shape, batch=3)
  variables = _random_stats(variables)
  spec = models.permutation_spec(name, variables, **config)
  check_spec(spec, variables)
  assert spec.sizes == models.groups(name, **config)
  assert spec.names == tuple(models.groups(name, **config))
  assert models.permutation_spec(name, _shapes(model, input_shape), **config) == spec
  # Every leaf takes part, but the heads' biases (outputs) and single units
  # (size-1 axes are never in groups).
  referenced = {r.path for refs in spec.groups.values() for r in refs}
  for path, leaf in tree_lib.leaves_by_path(variables).items():
    output = path[1].startswith("head") and path[-1] == "bias"
    assert (path in referenced) != (output or leaf.size == 1), path
  for g, refs in spec.groups.items():
    assert refs or spec.sizes[g] == 1, g
  apply = jax.jit(model.apply)
  out = apply(variables, x)
  for seed in (0, 1):
    perm = permute.random_permutation(spec, jax.random.key(seed))
    out_p = apply(permute.apply_permutation(spec, perm, variables), x)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_p), strict=True):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  # A broken spec, one axis of one group, changes the outputs (for every group).
  for g, refs in spec.groups.items():
    if refs:
      broken = PermutationSpec({g: [refs[0]]}, {g: spec.sizes[g]})
      shift = {g: np.roll(np.arange(spec.sizes[g]), 1)}
      assert _outputs_differ(out, apply(permute.apply_permutation(broken, shift, variables), x)), (g, refs[0])


def test_hand_specs_follow_the_documented_rule():
  def refs(name, config, input_shape, group):
    model = models.build(name, **config)
    return set(models.permutation_spec(name, _shapes(model, input_shape), **config).groups[group])

  p = lambda *keys: ("params", *keys)  # noqa: E731
  assert refs("mlp", dict(features=(6, 5), num_classes=(3, 4)), DIGITS, "hidden_1") == {
      AxisRef(p("hidden_1", "kernel"), 1), AxisRef(p("hidden_1", "bias"), 0),
      AxisRef(p("head_0", "kernel"), 0), AxisRef(p("head_1", "kernel"), 0)}
  # VGG: the flatten reads (h * w, channels); a 1x1 map reads the whole axis.
  last = refs("vgg", dict(features=(3, "M", 4), dense=(5,)), DIGITS, "conv_1")
  assert AxisRef(p("dense_0", "kernel"), 0, ((16, 4), 1)) in last
  assert {AxisRef(("batch_stats", "bn_1", "mean"), 0), AxisRef(("batch_stats", "bn_1", "var"), 0),
          AxisRef(p("bn_1", "scale"), 0), AxisRef(p("conv_1", "kernel"), 3)} < last
  one = refs("vgg", dict(features=(2, "M", 3, "M", 4, "M"), dense=(), batch_norm=False), DIGITS, "conv_2")
  assert one == {AxisRef(p("conv_2", "kernel"), 3), AxisRef(p("conv_2", "bias"), 0),
                 AxisRef(p("head", "kernel"), 0)}
  # ResNet-50: the stem has its own group, read by block 0's conv0 and projection.
  config = dict(stage_widths=(2, 3), blocks=(2, 1))
  stem = refs("resnet50", config, RGB, "stem")
  assert {AxisRef(p("stem_conv", "kernel"), 3), AxisRef(p("stage0_block0", "conv0", "kernel"), 2),
          AxisRef(p("stage0_block0", "proj_conv", "kernel"), 2)} < stem
  stage0 = refs("resnet50", config, RGB, "stage0")
  assert {AxisRef(p("stage0_block0", "proj_conv", "kernel"), 3),
          AxisRef(("batch_stats", "stage0_block0", "proj_bn", "var"), 0),
          AxisRef(p("stage0_block0", "conv2", "kernel"), 3), AxisRef(p("stage0_block1", "conv0", "kernel"), 2),
          AxisRef(p("stage1_block0", "proj_conv", "kernel"), 2)} < stage0
  assert refs("resnet50", config, RGB, "stage0.block1.conv1") == {
      AxisRef(p("stage0_block1", "conv1", "kernel"), 3), AxisRef(p("stage0_block1", "bn1", "scale"), 0),
      AxisRef(p("stage0_block1", "bn1", "bias"), 0), AxisRef(("batch_stats", "stage0_block1", "bn1", "mean"), 0),
      AxisRef(("batch_stats", "stage0_block1", "bn1", "var"), 0), AxisRef(p("stage0_block1", "conv2", "kernel"), 2)}
  # ResNet-20: the stem joins stage 0.
  assert AxisRef(p("stem_conv", "kernel"), 3) in refs("resnet20", SMALL["resnet20"][0], DIGITS, "stage0")
  # ViT attention.
  config = SMALL["vit"][0]
  att = lambda *keys: p("block1", "attention", *keys)  # noqa: E731
  assert refs("vit", config, DIGITS, "block1.heads") == {
      *(AxisRef(att(k, "kernel"), 1) for k in ("query", "key", "value")),
      *(AxisRef(att(k, "bias"), 0) for k in ("query", "key", "value")), AxisRef(att("out", "kernel"), 0)}
  assert refs("vit", config, DIGITS, "block1.qk_dim") == {
      AxisRef(att("query", "kernel"), 2), AxisRef(att("key", "kernel"), 2),
      AxisRef(att("query", "bias"), 1), AxisRef(att("key", "bias"), 1)}
  assert refs("vit", config, DIGITS, "block1.vo_dim") == {
      AxisRef(att("value", "kernel"), 2), AxisRef(att("value", "bias"), 1), AxisRef(att("out", "kernel"), 1)}
  embed = refs("vit", config, DIGITS, "embed")
  assert {AxisRef(p("patch_embed", "kernel"), 3), AxisRef(p("patch_embed", "bias"), 0),
          AxisRef(p("cls_token"), 2), AxisRef(p("pos_embedding"), 2), AxisRef(att("query", "kernel"), 0),
          AxisRef(att("out", "kernel"), 2), AxisRef(att("out", "bias"), 0), AxisRef(p("ln_final", "scale"), 0),
          AxisRef(p("block0", "mlp_out", "kernel"), 1), AxisRef(p("head", "kernel"), 0)} < embed
  # A group of one head lists no axes.
  assert refs("vit", dict(config, num_heads=(1, 3)), DIGITS, "block0.heads") == set()


def test_hand_spec_needs_the_flatten_reader():
  with pytest.raises(ValueError, match="no params/dense_0/kernel"):
    models.permutation_spec("vgg", {"params": {}}, features=(3, "M", 4), dense=(5,))
