"""Tests for experiments/merge_checkpoints.py: merges of checkpoint files, end to end.

Oracle: `mj.merge.<method>` in memory on the same arrays. Safetensors,
torch and orbax inputs, safetensors (one file or shards) and orbax outputs,
and conversion through a family (a stand-in converter built from a
`NameMap`, since the family table is filled elsewhere); every bad option is
refused before any tensor is read or anything is written.
"""

import json

from absl import flags
import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from experiments import merge_checkpoints as mc
import mergejax as mj
from mergejax.io import convert
from mergejax.io import out_of_core
from mergejax.io import state_dict

NUM_MODELS = 3


def _base():
  rng = np.random.default_rng(0)
  return {
      "fc.0.weight": rng.normal(size=(4, 3)).astype(np.float32),
      "fc.0.bias": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
      "fc.1.weight": rng.normal(size=(2, 4)).astype(np.float32),
  }


def _models():
  rng = np.random.default_rng(1)
  return [{n: (x.astype(np.float32) + 0.1 * rng.normal(size=x.shape)).astype(x.dtype) for n, x in _base().items()}
          for _ in range(NUM_MODELS)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  models = [state_dict.write_safetensors(root / f"model_{i}.safetensors", m) for i, m in enumerate(_models())]
  torch.save({n: torch.from_numpy(np.array(x, np.float32)) for n, x in _models()[0].items() if n != "fc.0.bias"}
             | {"fc.0.bias": torch.from_numpy(_models()[0]["fc.0.bias"].view(np.int16)).view(torch.bfloat16)},
             root / "model_0.pt")
  return {"base": state_dict.write_safetensors(root / "base.safetensors", _base()), "models": models,
          "torch": root / "model_0.pt"}


def _assert_equal(got, want):
  assert sorted(got) == sorted(want)
  for name in want:
    x, y = np.asarray(got[name]), np.asarray(want[name])
    assert x.dtype == y.dtype and x.shape == y.shape, name
    np.testing.assert_array_equal(x, y, err_msg=name)


def test_ties_of_three_safetensors_files_equals_the_in_memory_merge(files, tmp_path):
  flag_values = flags.FlagValues()
  mc.define_flags(flag_values)
  flag_values(["merge_checkpoints", "--method=ties", "--models=" + ",".join(map(str, files["models"])),
               f"--base={files['base']}", "--set=density=0.5", "--set=scale=0.8",
               f"--output={tmp_path / 'merged.safetensors'}"])
  out = mc.run_from_flags(flag_values)
  merged = mj.io.read_state_dict(out)
  _assert_equal(merged.arrays(), mj.merge.ties(_base(), _models(), density=0.5, scale=0.8))
  record = json.loads(merged.metadata["mergejax_merge"])
  assert record["method"] == "ties" and record["paths"] == [str(p) for p in files["models"]]


def test_torch_and_safetensors_inputs_to_orbax_and_sharded_outputs(files, tmp_path):
  models = [files["torch"]] + files["models"][1:]
  out = mc.run(method="average", models=[str(p) for p in models], output=str(tmp_path / "orbax"),
               output_format="orbax", options={"weights": [1.0, 2.0, 1.0]})
  want = mj.merge.average(_models(), weights=[1.0, 2.0, 1.0])
  restored = mj.io.restore(out)  # the tensor names' dots nest the tree
  assert jax.tree.structure(restored) == jax.tree.structure(
      {"fc": {"0": {"bias": 0, "weight": 0}, "1": {"weight": 0}}})
  _assert_equal({f"fc.{i}.{k}": v for i, layer in restored["fc"].items() for k, v in layer.items()}, want)
  sharded = mc.run(method="average", models=[str(p) for p in models], output=str(tmp_path / "sharded"),
                   max_shard_size="50B", options={"weights": [1.0, 2.0, 1.0]})
  assert len(list(sharded.glob("*.safetensors"))) == 2
  _assert_equal(mj.io.read_state_dict(sharded).arrays(), want)


RULES = [
    (r"fc\.(?P<i>\d+)\.weight", "params/Dense_{i}/kernel", "T"),
    (r"fc\.(?P<i>\d+)\.bias", "params/Dense_{i}/bias"),
]


def _converter():
  """A converter of the test's state dicts to `{"params": {"Dense_i": ...}}`, by a NameMap."""
  name_map = mj.io.NameMap(RULES)

  def like(kwargs):
    width, sds = kwargs["width"], jax.ShapeDtypeStruct
    return {"params": {"Dense_0": {"kernel": sds((3, width), np.float32), "bias": sds((width,), ml_dtypes.bfloat16)},
                       "Dense_1": {"kernel": sds((width, 2), np.float32)}}}

  return convert.Converter(
      zoo_name="mlp",
      infer_config=lambda state, config: {"width": state["fc.0.weight"].shape[0], **(config or {})},
      expected_shapes=lambda kwargs: {"fc.0.weight": (kwargs["width"], 3)},
      to_variables=lambda state, kwargs: name_map.to_variables(state, like(kwargs)),
      from_variables=lambda variables, kwargs: name_map.from_variables(variables),
  )


@pytest.mark.parametrize("output_format", ["safetensors", "orbax"])
def test_merges_through_a_family_converter(files, tmp_path, monkeypatch, output_format):
  monkeypatch.setitem(convert.CONVERTERS, "toy", _converter())
  suffix = ".safetensors" if output_format == "safetensors" else ""
  out = mc.run(method="ties", models=[str(p) for p in files["models"]], base=str(files["base"]),
               output=str(tmp_path / f"merged{suffix}"), output_format=output_format, family="toy",
               options={"density": 0.5})
  # TIES ranks within each tensor and is elementwise otherwise: a transposed leaf merges alike.
  want = mj.merge.ties(_base(), _models(), density=0.5)
  if output_format == "safetensors":
    merged = mj.io.read_state_dict(out)
    _assert_equal(merged.arrays(), want)
    assert json.loads(merged.metadata["mergejax_merge"])["family"] == "toy"
  else:
    _assert_equal(mj.io.NameMap(RULES).from_variables(mj.io.restore(out)), want)
    assert mj.io.load_metadata(out)["config"] == {"width": 4}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["merged" + suffix]


def _other_shapes(tmp_path):
  return str(state_dict.write_safetensors(tmp_path / "other.safetensors", {**_base(), "fc.1.weight": np.zeros((3, 4), np.float32)}))


ERRORS = [
    ({"method": "ties", "options": {"density": 0.5, "bogus": 1}}, ValueError, r"ties takes no \['bogus'\]"),
    ({"method": "ties", "options": {"density": 2.0}}, ValueError, "density must be in"),
    ({"method": "ties", "seed": 0}, ValueError, "ties is not random: it takes no --seed"),
    ({"method": "dare", "options": {"drop": 0.5}}, ValueError, "dare draws random masks: pass --seed"),
    ({"method": "ties", "base": None}, ValueError, "ties merges task vectors: pass base_path"),
    ({"method": "ties", "models": ["nowhere.safetensors"]}, FileNotFoundError, "nowhere.safetensors"),
    ({"method": "ties", "output_format": "orbax", "max_shard_size": "1GB"}, ValueError, "--max_shard_size is for"),
    ({"method": "ties", "output_format": "npz"}, ValueError, "--output_format='npz' is not one of"),
    ({"method": "ties", "family": "nope"}, ValueError, "--family='nope' is not one of"),
    ({"method": "ties", "family_config": "config.json"}, ValueError, "--family_config is for --family"),
    ({"method": "ties", "base": "OTHER"}, ValueError, r"other.safetensors differ: fc/1/weight: \(2, 4\) vs \(3, 4\)"),
    ({"method": "ties", "output": "EXISTING"}, FileExistsError, "pass --overwrite"),
    ({"method": "ties", "output": "merged.st"}, ValueError, "merged.st: a safetensors file's name must end in"),
    ({"method": "ties", "max_shard_size": "1GB"}, ValueError, "shards go into a directory"),
]


@pytest.mark.parametrize("change,error,match", ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_options_are_checked_before_any_work(files, tmp_path, monkeypatch, change, error, match):
  (tmp_path / "existing.safetensors").write_text("keep me")
  arguments = {"models": [str(p) for p in files["models"]], "base": str(files["base"]),
               "output": str(tmp_path / "merged.safetensors"), "options": {"density": 0.5}, **change}
  if arguments["base"] == "OTHER":
    arguments["base"] = _other_shapes(tmp_path)
  if arguments["output"] == "EXISTING":
    arguments["output"] = str(tmp_path / "existing.safetensors")
  before = sorted(tmp_path.iterdir())

  def no_read(*args):
    raise AssertionError("a tensor was read before the error")

  monkeypatch.setattr(state_dict, "_read_bytes", no_read)
  with pytest.raises(error, match=match):
    mc.run(**arguments)
  assert sorted(tmp_path.iterdir()) == before


def test_parse_options():
  assert mc.parse_options(["density=0.2", "trim=global", "weights=[1, 2]"]) == {
      "density": 0.2, "trim": "global", "weights": [1, 2]}
  with pytest.raises(ValueError, match="'density' is not name=value"):
    mc.parse_options(["density"])
  with pytest.raises(ValueError, match="gives scale twice"):
    mc.parse_options(["scale=1", "scale=2"])
  assert set(out_of_core.METHODS) <= set(dir(mj.merge))


def test_a_failure_midway_leaves_no_safetensors_output(files, tmp_path, monkeypatch):
  calls = []  # the dry run, then one call per tensor
  merge_trees = out_of_core._merge_trees

  def failing(*args):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError("injected failure")
    return merge_trees(*args)

  monkeypatch.setattr(out_of_core, "_merge_trees", failing)
  with pytest.raises(RuntimeError, match="injected failure"):
    mc.run(method="average", models=[str(p) for p in files["models"]], output=str(tmp_path / "m.safetensors"))
  assert not list(tmp_path.iterdir())


def test_tensor_names_must_nest_into_one_tree(tmp_path):
  path = state_dict.write_safetensors(tmp_path / "odd.safetensors", {"a": np.ones(1, np.float32),
                                                                      "a.b": np.ones(1, np.float32)})
  with pytest.raises(ValueError, match="tensors 'a' and 'a.b' cannot both be leaves of one tree"):
    mj.io.merge_checkpoints("average", [path], tmp_path / "out.safetensors", output_format="safetensors")


def _nested(flat):
  """A flat state dict as the tree its names' dots nest: {"fc": {"0": {"weight": ...}}}."""
  tree = {}
  for name, x in flat.items():
    *parents, leaf = name.split(".")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = x
  return tree


def test_dare_of_flat_files_draws_the_nested_trees_keys(tmp_path):
  rng = np.random.default_rng(2)
  base = {"fc.0.weight": rng.normal(size=(4, 3)).astype(np.float32)}
  models = [{"fc.0.weight": base["fc.0.weight"] + rng.normal(size=(4, 3)).astype(np.float32)} for _ in range(2)]
  paths = [str(state_dict.write_safetensors(tmp_path / f"{i}.safetensors", m)) for i, m in enumerate(models)]
  out = mc.run(method="dare", models=paths, base=str(state_dict.write_safetensors(tmp_path / "b.safetensors", base)),
               output=str(tmp_path / "dare.safetensors"), options={"drop": 0.5}, seed=3)
  got = np.asarray(mj.io.read_state_dict(out)["fc.0.weight"])
  key = jax.random.key(3)
  nested = mj.merge.dare(_nested(base), [_nested(m) for m in models], drop=0.5, key=key)
  np.testing.assert_array_equal(got, nested["fc"]["0"]["weight"])  # keys by path fc/0/weight, not fc.0.weight
