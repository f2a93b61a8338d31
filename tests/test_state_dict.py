"""Tests for mergejax.io.state_dict: safetensors and torch state dicts in, safetensors out.

Oracles: the `safetensors` package (its torch and flax loaders read what we
write; we read what its writers write), torch's own save, and bit-exact
round trips. Laziness is tested by counting reads; every error by its
message naming the file and tensor.
"""

import json
import pathlib
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors import flax as st_flax
from safetensors import torch as st_torch
import torch

from mergejax import io
from mergejax.io import convert
from mergejax.io import state_dict

BF16 = ml_dtypes.bfloat16


def _tensors():
  rng = np.random.default_rng(0)
  return {
      "encoder.weight": rng.normal(size=(4, 3)).astype(np.float32),
      "encoder.bias": rng.normal(size=(4,)).astype(BF16),
      "head.weight": rng.normal(size=(2, 4)).astype(np.float16),
      "position_ids": np.arange(6, dtype=np.int64).reshape(1, 6),
      "mask": rng.normal(size=(3,)) > 0,
      "scale": np.full((), 2.5, np.float64),
      "empty": np.zeros((0, 3), np.float32),
  }


def _torch(x):
  """A NumPy array as a torch tensor of the same dtype (bfloat16 through its bits)."""
  if x.dtype == BF16:
    return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(np.array(x))


def _numpy(t):
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(BF16)
  return t.numpy()


def _assert_same(got, want, ordered=True):
  assert list(got) == list(want) if ordered else sorted(got) == sorted(want)
  for name in want:
    x, y = np.asarray(got[name]), want[name]
    assert x.dtype == y.dtype and x.shape == y.shape, name
    assert x.tobytes() == y.tobytes(), name


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp("written")
  return state_dict.write_safetensors(root / "model.safetensors", _tensors(), metadata={"note": "hi"})


def test_round_trip_keeps_every_dtype_and_value(written):
  state = io.read_state_dict(written)
  assert {n: (e.shape, e.dtype) for n, e in state.items()} == {
      n: (x.shape, x.dtype) for n, x in _tensors().items()}
  _assert_same(state, _tensors())
  assert state.metadata == {"format": "pt", "note": "hi"}
  _assert_same(state.arrays(), _tensors())


def test_safetensors_library_loads_what_we_write(written):
  loaded = st_torch.load_file(written)
  assert set(loaded) == set(_tensors())
  for name, want in _tensors().items():
    assert _numpy(loaded[name]).tobytes() == want.tobytes() and tuple(loaded[name].shape) == want.shape, name
  flax_loaded = st_flax.load_file(written)
  assert flax_loaded["encoder.bias"].dtype == BF16
  np.testing.assert_array_equal(np.asarray(flax_loaded["encoder.bias"]), _tensors()["encoder.bias"])


def test_reads_what_the_safetensors_library_writes(tmp_path):
  tensors = _tensors()
  del tensors["empty"]
  st_torch.save_file({n: _torch(x) for n, x in tensors.items()}, tmp_path / "torch.safetensors",
                     metadata={"format": "pt"})
  state = io.read_state_dict(tmp_path / "torch.safetensors")
  _assert_same(state, tensors, ordered=False)  # in the file's data order, which safetensors chooses


def test_entries_know_shape_and_dtype_before_any_read(written, monkeypatch):
  reads = []
  read_bytes = state_dict._read_bytes
  monkeypatch.setattr(state_dict, "_read_bytes", lambda *a: reads.append(a) or read_bytes(*a))
  state = io.read_state_dict(written)
  shapes = {n: tuple(x.shape) for n, x in _tensors().items()}
  convert.check_state(state, shapes, where=str(written))
  with pytest.raises(ValueError, match=r"encoder.weight: \(4, 3\), expected \(3, 4\)"):
    convert.check_state(state, {**shapes, "encoder.weight": (3, 4)})
  assert state["head.weight"].nbytes == 16 and state["head.weight"].ndim == 2 and not reads
  np.testing.assert_array_equal(np.asarray(state["head.weight"]), _tensors()["head.weight"])
  assert len(reads) == 1


def test_cast_on_request_only_floating_tensors(written):
  state = io.read_state_dict(written, dtype="float32")
  for name, want in _tensors().items():
    entry = state[name]
    if want.dtype.kind in "iub":
      assert entry.dtype == want.dtype, name
      np.testing.assert_array_equal(np.asarray(entry), want)
    else:
      assert entry.dtype == np.float32 and np.asarray(entry).dtype == np.float32, name
      np.testing.assert_array_equal(np.asarray(entry), want.astype(np.float32))
  with pytest.raises(ValueError, match="dtype=int32: only a floating dtype"):
    io.read_state_dict(written, dtype="int32")


def test_sharded_write_and_read(tmp_path):
  tensors = _tensors()
  out = io.write_safetensors(tmp_path / "sharded", tensors, max_shard_size=40)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(p.name for p in out.glob("*.safetensors"))
  assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
  assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
  assert index["metadata"]["total_size"] == sum(x.nbytes for x in tensors.values())
  for file in files:  # a shard holds what fits in 40 bytes, or one larger tensor alone
    shard = st_torch.load_file(out / file)
    assert {n for n, f in index["weight_map"].items() if f == file} == set(shard)
    assert sum(t.nbytes for t in shard.values()) <= 40 or len(shard) == 1
  for path in (out, out / "model.safetensors.index.json"):
    _assert_same(io.read_state_dict(path), tensors)
  with pytest.raises(ValueError, match="max_shard_size '40 apples'"):
    io.write_safetensors(tmp_path / "bad", tensors, max_shard_size="40 apples")
  assert state_dict.parse_size("2GiB") == 2**31 and state_dict.parse_size("500MB") == 5 * 10**8


def test_tied_tensors_are_written_once(tmp_path):
  wte = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
  tensors = {"wte.weight": wte, "lm_head.weight": wte, "ln.weight": np.ones(3, np.float32)}
  with pytest.raises(ValueError, match="'wte.weight' and 'lm_head.weight' are the same tensor"):
    io.write_safetensors(tmp_path / "shared.safetensors", tensors)
  with pytest.raises(ValueError, match="'wte.weight' and 'view' are the same tensor or share memory"):
    io.write_safetensors(tmp_path / "view.safetensors", {"wte.weight": wte, "view": wte[1:]})
  out = io.write_safetensors(tmp_path / "tied.safetensors", tensors, aliases={"lm_head.weight": "wte.weight"})
  assert set(st_torch.load_file(out)) == {"wte.weight", "ln.weight"}
  np.testing.assert_array_equal(np.asarray(io.read_state_dict(out)["wte.weight"]), wte)
  with pytest.raises(ValueError, match="'lm_head.weight' .* differs from 'wte.weight'"):
    io.write_safetensors(tmp_path / "untied.safetensors", {**tensors, "lm_head.weight": wte + 1},
                         aliases={"lm_head.weight": "wte.weight"})
  with pytest.raises(ValueError, match="'x' -> 'nowhere', which is not a written tensor"):
    io.write_safetensors(tmp_path / "x.safetensors", tensors, aliases={"x": "nowhere"})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tied.safetensors"]


def test_lazy_values_are_written_one_at_a_time(tmp_path):
  order = []

  def lazy(name, x):
    return state_dict.LazyTensor(x.shape, x.dtype, lambda: order.append(name) or x, name)

  tensors = {n: lazy(n, x) for n, x in _tensors().items()}
  out = io.write_safetensors(tmp_path / "lazy.safetensors", tensors)
  assert order == list(_tensors())
  _assert_same(io.read_state_dict(out), _tensors())
  wrong = {"w": state_dict.LazyTensor((2,), np.float32, lambda: np.zeros(3, np.float32), "w")}
  with pytest.raises(ValueError, match=r"w: read \(3,\) float32, declared \(2,\) float32"):
    io.write_safetensors(tmp_path / "wrong.safetensors", wrong)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["lazy.safetensors"]


def test_writer_errors_name_the_tensor(tmp_path, written):
  with pytest.raises(ValueError, match="tensor 'c': dtype complex64 has no safetensors code"):
    io.write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})
  with pytest.raises(ValueError, match="tensor 'l' is a list, not an array"):
    io.write_safetensors(tmp_path / "l.safetensors", {"l": [1.0]})
  with pytest.raises(ValueError, match="metadata must map strings to strings"):
    io.write_safetensors(tmp_path / "m.safetensors", {}, metadata={"n": 1})
  with pytest.raises(FileExistsError, match="overwrite=True"):
    io.write_safetensors(written, {})
  assert not list(tmp_path.iterdir())


def _broken(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content)
  return path


def _header(entries, data=b""):
  encoded = json.dumps(entries).encode()
  return len(encoded).to_bytes(8, "little") + encoded + data


def _torch_file(tmp_path):
  path = tmp_path / "weights.pt"
  torch.save({"w": torch.ones(2)}, path)
  return path


READ_ERRORS = [
    (lambda t: _broken(t, "zip.safetensors", _torch_file(t).read_bytes()), "zip archive"),
    (lambda t: _broken(t, "pickle.safetensors", b"\x80\x02}q\x00."), "is a pickle"),
    (lambda t: _broken(t, "short.safetensors", b"\x05\x00"), "too short for the 8-byte header length"),
    (lambda t: _broken(t, "cut.safetensors", _header({"w": {}})[:-3]), "truncated"),
    (lambda t: _broken(t, "text.safetensors", (6).to_bytes(8, "little") + b"{nope}"), "header is not JSON"),
    (lambda t: _broken(t, "dtype.safetensors", _header({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0")),
     "tensor 'w': dtype 'Q7'"),
    (lambda t: _broken(t, "short_data.safetensors", _header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4)),
     r"tensor 'w': data_offsets \[0, 8\] are not a byte range within the file's 4 bytes"),
    (lambda t: _broken(t, "size.safetensors", _header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)),
     r"tensor 'w': data_offsets \[0, 8\] hold 8 bytes; shape \[3\] of F32 needs 12"),
    (lambda t: _broken(t, "weights.npz", b""), "unknown state dict format"),
    (lambda t: _broken(t, "st.bin", _header({})), "is not a torch checkpoint"),
    (lambda t: t / "missing.safetensors", "does not exist"),
]


@pytest.mark.parametrize("make,match", READ_ERRORS, ids=[m for _, m in READ_ERRORS])
def test_a_file_that_is_not_what_its_name_says_is_named(tmp_path, make, match):
  path = make(tmp_path)
  with pytest.raises((ValueError, FileNotFoundError), match=match) as error:
    io.read_state_dict(path)
  assert path.name in str(error.value)


def test_sharded_index_errors(tmp_path):
  out = io.write_safetensors(tmp_path / "sharded", _tensors(), max_shard_size=40)
  index_path = out / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  files = list(index["weight_map"].values())
  first = next(n for n, f in index["weight_map"].items() if files.count(f) > 1)  # in a shard with others
  for change, match in [
      (lambda i: i["weight_map"].update({"ghost": i["weight_map"][first]}), "tensor 'ghost' is not in"),
      (lambda i: i["weight_map"].update({first: "gone.safetensors"}), "gone.safetensors, which does not exist"),
      (lambda i: i["weight_map"].pop(first), f"holds tensors the index does not put there: \\['{first}'\\]"),
      (lambda i: i.pop("weight_map"), "no weight_map"),
  ]:
    broken = json.loads(json.dumps(index))
    change(broken)
    index_path.write_text(json.dumps(broken))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      io.read_state_dict(out)
  index_path.unlink()
  with pytest.raises(ValueError, match="several safetensors files"):
    io.read_state_dict(out)


def test_torch_files_round_trip_with_their_dtypes(tmp_path):
  tensors = _tensors()
  weights = {n: _torch(x) for n, x in tensors.items()}
  weights["tied"] = weights["encoder.weight"]  # shared storage, as tied weights are
  torch.save(weights, tmp_path / "model.bin")
  state = io.read_state_dict(tmp_path / "model.bin")
  _assert_same(state, {**tensors, "tied": tensors["encoder.weight"]})
  torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "lightning.ckpt.pt")
  with pytest.raises(ValueError, match="state_dict is a dict, not a tensor; .* pass entry="):
    io.read_state_dict(tmp_path / "lightning.ckpt.pt")
  _assert_same(io.read_state_dict(tmp_path / "lightning.ckpt.pt", entry="state_dict"),
               {**tensors, "tied": tensors["encoder.weight"]})
  with pytest.raises(ValueError, match=r"has no entry 'model'; it holds \['epoch', 'state_dict'\]"):
    io.read_state_dict(tmp_path / "lightning.ckpt.pt", entry="model")


class Pickled:
  """Not a tensor: torch.load(weights_only=True) refuses to build it."""


def test_a_torch_pickle_with_code_is_refused(tmp_path):
  path = tmp_path / "code.pt"
  torch.save({"w": torch.ones(2), "object": Pickled()}, path)
  with pytest.raises(ValueError, match=r"code.pt cannot be loaded with torch.load\(weights_only=True\): it"
                                       r" pickles .*Pickled. mergejax never unpickles code"):
    io.read_state_dict(path)


def test_torch_files_need_torch(tmp_path, monkeypatch):
  path = _torch_file(tmp_path)
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="weights.pt needs torch"):
    io.read_state_dict(path)


def test_state_dict_files_are_named_in_errors(written):
  state = io.read_state_dict(written)
  with pytest.raises(KeyError, match="has no tensor 'nope'"):
    state["nope"]  # pylint: disable=pointless-statement
  assert pathlib.Path(state.source) == written and "encoder.weight" in repr(state["encoder.weight"])


def test_a_header_length_that_starts_like_a_pickle_is_read(tmp_path):
  for n in range(1, 200):  # a name length that makes the header 128 bytes: its first byte is 0x80
    path = io.write_safetensors(tmp_path / f"{n}.safetensors", {"w" * n: np.ones(2, np.float32)})
    if path.read_bytes()[:1] == b"\x80":
      break
  assert path.read_bytes()[:2] == b"\x80\x00"
  np.testing.assert_array_equal(np.asarray(io.read_state_dict(path)["w" * n]), np.ones(2, np.float32))
