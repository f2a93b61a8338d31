"""Tests for the embedded text corpus (mergejax.data: stdlib_text, build_text)
and for the perplexity of experiments/evaluate.py on the zoo's language model."""

import gzip
import hashlib
import io
import json
import pathlib
import shutil
import sys
import tokenize

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import evaluate
from mergejax import data
from mergejax import models
from mergejax.data import build_text
from mergejax.data import loaders

TEXT = pathlib.Path(build_text.__file__).resolve().parent / "text"


def _manifest():
  return json.loads((TEXT / "manifest.json").read_text())


def test_shipped_files_match_their_manifest():
  manifest = _manifest()
  assert set(manifest["files"]) == {"code", "prose"}
  for domain, entry in manifest["files"].items():
    packed = (TEXT / entry["name"]).read_bytes()
    assert hashlib.sha256(packed).hexdigest() == entry["sha256"]
    text = gzip.decompress(packed)
    assert hashlib.sha256(text).hexdigest() == entry["text_sha256"]
    assert len(text) == entry["bytes"] and len(packed) == entry["gzip_bytes"]
    assert loaders.text_bytes(domain) == text
  total = sum(e["gzip_bytes"] for e in manifest["files"].values())
  assert total < 1_000_000, "the corpus should stay well under a few MB"


def test_a_corrupted_copy_is_refused_with_the_rebuild_hint(tmp_path):
  shutil.copytree(TEXT, tmp_path / "text")
  path = tmp_path / "text" / "stdlib_prose.txt.gz"
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"(?s)stdlib_prose.txt.gz has sha256 .*python -m mergejax.data.build_text"):
    data.load("stdlib_text", text_dir=str(tmp_path / "text"))
  # The code domain alone is intact and loads.
  assert data.load("stdlib_text", text_dir=str(tmp_path / "text"), domains=("code",)).domains == ("code",)
  path.unlink()
  with pytest.raises(FileNotFoundError, match="build_text"):
    data.load("stdlib_text", text_dir=str(tmp_path / "text"), domains="prose")


def test_windows_are_deterministic_shifted_by_one_and_split_by_position():
  ds = data.load("stdlib_text")
  again = data.load("stdlib_text", seed=5)  # nothing is random
  for field in ("x_train", "y_train", "x_test", "y_test", "domain_train", "domain_test"):
    np.testing.assert_array_equal(getattr(ds, field), getattr(again, field))
  assert ds.domains == ("code", "prose") and ds.vocab_size == ds.num_classes == 256
  sizes = {d: (int((ds.domain_train == i).sum()), int((ds.domain_test == i).sum())) for i, d in enumerate(ds.domains)}
  assert sizes == {"code": (9057, 1006), "prose": (5170, 574)}  # the loader's docstring
  assert ds.x_train.shape == (9057 + 5170, 128) and ds.x_train.dtype == np.int32
  for i, domain in enumerate(ds.domains):
    stream = np.frombuffer(loaders.text_bytes(domain), np.uint8)
    cut = round(0.9 * len(stream))
    x, y = ds.x_train[ds.domain_train == i], ds.y_train[ds.domain_train == i]
    np.testing.assert_array_equal(x.reshape(-1), stream[:x.size])  # consecutive windows, in order
    np.testing.assert_array_equal(y.reshape(-1), stream[1:x.size + 1])
    xt = ds.x_test[ds.domain_test == i]
    np.testing.assert_array_equal(xt.reshape(-1), stream[cut:cut + xt.size])  # the test part is the end
  small = data.load("stdlib_text", context=16, test_fraction=0.5, max_bytes=1000, domains=("prose",))
  assert small.name == "stdlib_text/prose" and small.x_train.shape == (31, 16) and small.x_test.shape == (31, 16)


def test_domains_are_disjoint():
  ds = data.load("stdlib_text", context=64)
  code, prose = data.split(ds, "text_domains")
  assert (code.name, prose.name) == ("stdlib_text/code", "stdlib_text/prose")
  rows = lambda x: {r.tobytes() for r in x}  # noqa: E731
  assert not (rows(code.x_train) | rows(code.x_test)) & (rows(prose.x_train) | rows(prose.x_test))
  assert len(code.x_train) + len(prose.x_train) == len(ds.x_train)
  # Code holds no comment lines and no docstrings; prose holds no `def` lines.
  code_text = loaders.text_bytes("code").decode()
  prose_text = loaders.text_bytes("prose").decode()
  comments = [t for t in tokenize.generate_tokens(io.StringIO(code_text).readline) if t.type == tokenize.COMMENT]
  assert not comments
  assert '"""Abstract Base Classes (ABCs) according to PEP 3119."""' not in code_text
  assert "Abstract Base Classes (ABCs) according to PEP 3119." in prose_text
  assert "def abstractmethod(funcobj):" in code_text and "def abstractmethod(" not in prose_text


def test_split_source_separates_code_from_prose():
  source = (
      '#!/usr/bin/env python\n"""Module doc."""\nimport os  # why os\n\n\ndef f(x):\n'
      '    """F\'s doc.\n\n    More.\n    """\n    # Two lines\n    # of comment.\n    return x\n\n\n'
      'def g():\n    """Only a docstring."""\n\ns = "# not a comment"\n')
  code, prose = build_text.split_source(source)
  assert code == 'import os\n\n\ndef f(x):\n    return x\n\n\ndef g():\n    pass\n\ns = "# not a comment"\n'
  assert prose == "Module doc.\n\nwhy os\n\nF's doc.\n\nMore.\n\nTwo lines\nof comment.\n\nOnly a docstring.\n"


def test_the_build_script_reproduces_the_shipped_files(tmp_path):
  manifest = _manifest()
  here = "{}.{}.{}".format(*sys.version_info[:3])
  if manifest["python"] != here or manifest["implementation"] != sys.implementation.name:
    pytest.skip(f"the corpus was built on {manifest['implementation']} {manifest['python']}, this is"
                f" {sys.implementation.name} {here}: its standard library differs")
  rebuilt = build_text.write(tmp_path)
  assert rebuilt == manifest
  for entry in manifest["files"].values():
    assert (tmp_path / entry["name"]).read_bytes() == (TEXT / entry["name"]).read_bytes()


@pytest.mark.parametrize("option, match", [
    ({"context": 0}, "context must be a positive int"),
    ({"domains": ("code", "poetry")}, "domains must be distinct names"),
    ({"domains": ()}, "domains must be distinct names"),
    ({"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\)"),
    ({"max_bytes": 100, "context": 128}, "holds no window of 128"),
    ({"shuffle": True}, "no option.*shuffle"),
])
def test_bad_options_are_refused(option, match):
  with pytest.raises(ValueError, match=match):
    data.load("stdlib_text", **option)


def test_perplexity_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((5, 7, 256)).astype(np.float32) * 3
  y = rng.integers(0, 256, (5, 7))
  x = np.arange(5)[:, None] * np.ones((1, 7), int)  # row i's logits are logits[i]
  p = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  nll = -np.mean(np.log(np.take_along_axis(p, y[..., None], -1)))
  scores = evaluate.perplexity(lambda ids: logits[ids[:, 0]], x, y, chunk=2)  # ragged chunks
  np.testing.assert_allclose(scores["nll"], nll, rtol=1e-6)
  np.testing.assert_allclose(scores["perplexity"], np.exp(nll), rtol=1e-6)
  np.testing.assert_allclose(scores["bits_per_byte"], nll / np.log(2), rtol=1e-6)
  uniform = evaluate.perplexity(lambda ids: np.zeros((*ids.shape, 256), np.float32), x, y)
  np.testing.assert_allclose([uniform["perplexity"], uniform["bits_per_byte"]], [256, 8], rtol=1e-6)


def test_training_on_one_domain_lowers_its_perplexity():
  ds = data.load("stdlib_text", context=32, domains=("code",), max_bytes=200_000)
  cfg = dict(style="llama", embed_dim=32, depth=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  model = models.build("lm", **cfg)
  params = jax.jit(model.init)(jax.random.key(0), ds.x_train[:1])["params"]
  opt = optax.adam(3e-3)
  steps, batch = 300, 32
  idx = np.random.default_rng(0).integers(0, len(ds.x_train), (steps, batch))
  xs, ys = jnp.asarray(ds.x_train[idx]), jnp.asarray(ds.y_train[idx])

  def loss(p, x, y):
    logits = model.apply({"params": p}, x)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0])

  @jax.jit
  def train(p):
    def step(carry, xy):
      p, s = carry
      value, g = jax.value_and_grad(loss)(p, *xy)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), value
    (p, _), values = jax.lax.scan(step, (p, opt.init(p)), (xs, ys))
    return p, values

  logits_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
  before = evaluate.perplexity(lambda x: logits_fn(params, x), ds.x_test, ds.y_test)
  trained, values = train(params)
  after = evaluate.perplexity(lambda x: logits_fn(trained, x), ds.x_test, ds.y_test)
  assert before["perplexity"] > 200  # about uniform over 256 bytes at initialisation
  assert after["perplexity"] < 0.25 * before["perplexity"] and after["bits_per_byte"] < 4
  assert float(values[-20:].mean()) < float(values[:20].mean())
  print(f"code perplexity {before['perplexity']:.1f} -> {after['perplexity']:.2f} ({after['bits_per_byte']:.2f} bits/byte)")
