"""Tests for mergejax.merge.lora: low-rank merges against NumPy references
(materialised sums, truncated SVDs, a k-means step), their identities, and
their errors."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax.merge.lora import LoRA
from tests.test_average import assert_trees_close
from tests.test_task_vectors import BAD_INPUT_BASE


def _product(lora):
  """float64 down @ up: the change a LoRA makes to its kernel."""
  return np.asarray(lora.down, np.float64) @ np.asarray(lora.up, np.float64)


def _loras(adapter):
  """[(path 'a/b', LoRA)] in flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=lambda x: isinstance(x, LoRA))
  return [("/".join(str(k.key) for k in p), lora) for p, lora in flat]


def _nested(path, leaf):
  """`leaf` in dicts nested along `path` ('a/b/c')."""
  for k in reversed(path.split("/")):
    leaf = {k: leaf}
  return leaf


def _truncated_svd(matrix, k):
  u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
  return (u[:, :k] * s[:k]) @ vt[:k]


_SHAPES = ((4, 3), (2, 3, 2))  # Fixed, so that examples share compilations.


@st.composite
def adapter_sets(draw, ranks):
  """`(base, adapters)`: one adapter per rank, of the two kernels of a base.

  The kernels are (4, 3) and (2, 3, 2) (a convolution-like kernel whose `in`
  is its leading axes flattened); the base also has a bias. Entries are
  standard normal.
  """
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  base = {"params": {f"k{j}": rng.normal(size=s).astype(np.float32) for j, s in enumerate(_SHAPES)}}
  base["params"]["bias"] = rng.normal(size=3).astype(np.float32)

  def adapter(r):
    return {"params": {
        f"k{j}": LoRA(rng.normal(size=(int(np.prod(s[:-1])), r)).astype(np.float32),
                      rng.normal(size=(r, s[-1])).astype(np.float32))
        for j, s in enumerate(_SHAPES)
    }}

  return base, [adapter(r) for r in ranks]


scales = st.floats(-2.0, 2.0)
keys = st.integers(0, 2**31 - 1).map(jax.random.key)


@hypothesis.settings(max_examples=8)  # each example compiles anew
@hypothesis.given(adapter_sets((1, 2, 1)), st.lists(scales, min_size=3, max_size=3), scales)
def test_sum_and_apply_match_the_materialised_changes(case, s, scale):
  base, adapters = case
  summed = mj.merge.lora_sum(adapters, scale=s)
  merged = mj.merge.lora_apply(base, summed, scale=scale)
  for j, (path, lora) in enumerate(_loras(summed)):
    want = sum(si * _product(_loras(a)[j][1]) for si, a in zip(s, adapters))
    np.testing.assert_allclose(_product(lora), want, rtol=1e-5, atol=1e-5, err_msg=path)
    assert lora.down.shape[1] == sum(_loras(a)[j][1].down.shape[1] for a in adapters)
    kernel = base["params"][path.split("/")[-1]]
    np.testing.assert_allclose(
        merged["params"][path.split("/")[-1]],
        kernel + scale * want.reshape(kernel.shape), rtol=1e-5, atol=1e-5, err_msg=path,
    )
  np.testing.assert_array_equal(merged["params"]["bias"], base["params"]["bias"])


@hypothesis.settings(max_examples=8)  # each example compiles anew
@hypothesis.given(adapter_sets((2, 3)))
def test_compress_is_the_truncated_svd_of_the_product(case):
  _, adapters = case
  summed = mj.merge.lora_sum(adapters)
  for rank in (2, 5):  # Truncated, and the full rank 5 of the sum.
    for path, lora in _loras(mj.merge.lora_compress(summed, rank)):
      product = _product(dict(_loras(summed))[path])
      assert lora.down.shape[1] == lora.up.shape[0] == rank
      # Near-equal singular values at the cut make the truncation itself
      # ill-conditioned: compare where they are apart.
      s = np.linalg.svd(product, compute_uv=False)
      if rank < len(s) and s[rank - 1] - s[rank] < 1e-2 * s[0]:
        continue
      np.testing.assert_allclose(
          _product(lora), _truncated_svd(product, rank), rtol=1e-4, atol=1e-4, err_msg=path
      )
      if rank == 5:
        np.testing.assert_allclose(_product(lora), product, rtol=1e-5, atol=1e-5, err_msg=path)


def test_extract_is_the_truncated_svd_of_the_task_vector():
  rng = np.random.default_rng(0)
  base = {"dense": {"kernel": rng.normal(size=(6, 5)).astype(np.float32),
                    "bias": np.zeros(5, np.float32)},
          "conv": {"kernel": rng.normal(size=(2, 2, 3, 4)).astype(np.float32)}}
  tuned = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base)
  adapter = mj.merge.lora_extract(base, tuned, rank=2)
  assert set(adapter) == {"dense", "conv"} and set(adapter["dense"]) == {"kernel"}
  for name in ("dense", "conv"):
    b, x = base[name]["kernel"], tuned[name]["kernel"]
    tau = (x - b).reshape(-1, b.shape[-1])
    np.testing.assert_allclose(
        _product(adapter[name]["kernel"]), _truncated_svd(tau, 2), rtol=1e-4, atol=1e-4
    )
  # A rank above min(in, out) is exact, with zero units padding the factors.
  wide = mj.merge.lora_extract(base, tuned, rank=7)["dense"]["kernel"]
  assert wide.down.shape == (6, 7) and wide.up.shape == (7, 5)
  np.testing.assert_array_equal(wide.up[5:], 0)
  np.testing.assert_allclose(
      mj.merge.lora_apply(base, {"dense": {"kernel": wide}})["dense"]["kernel"],
      tuned["dense"]["kernel"], rtol=1e-5, atol=1e-5,
  )


def test_peft_conversion_round_trips():
  rng = np.random.default_rng(1)
  lora_A = rng.normal(size=(4, 7)).astype(np.float32)  # [r, in]
  lora_B = rng.normal(size=(3, 4)).astype(np.float32)  # [out, r]
  lora = mj.merge.lora_from_peft(lora_A, lora_B, alpha=16)
  assert lora.down.shape == (7, 4) and lora.up.shape == (4, 3)
  # The torch weight [out, in] changes by (alpha / r) B @ A; the kernel by its transpose.
  np.testing.assert_allclose(_product(lora), (16 / 4 * lora_B @ lora_A).T, rtol=1e-5, atol=1e-5)
  back_A, back_B = mj.merge.lora_to_peft(lora, alpha=16)
  np.testing.assert_array_equal(back_A, lora_A)
  np.testing.assert_allclose(back_B, lora_B, rtol=1e-6)


@hypothesis.settings(max_examples=8)  # each example compiles anew
@hypothesis.given(adapter_sets((1, 2)), keys)
def test_lego_with_one_unit_per_cluster_is_the_sum(case, key):
  _, adapters = case
  lego = mj.merge.lora_lego(adapters, 3, key=key)  # k = all 3 units.
  for (path, got), (_, want) in zip(_loras(lego), _loras(mj.merge.lora_sum(adapters))):
    np.testing.assert_allclose(_product(got), _product(want), rtol=1e-5, atol=1e-5, err_msg=path)


def _units(loras):
  """f64[M, in + out]: the units [down[:, j]; up[j]] in adapter, then unit, order."""
  return np.concatenate(
      [np.concatenate([np.asarray(l.down).T, np.asarray(l.up)], axis=1) for l in loras]
  ).astype(np.float64)


def reference_lego_step(loras, start, rescale):
  """One Lloyd step from the units at indices `start`, then the norm rescale."""
  units = _units(loras)
  centres = units[start]
  distances = ((units[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
  assignment = distances.argmin(axis=1)
  new = centres.copy()
  for j in range(len(centres)):
    members = units[assignment == j]
    if len(members):
      new[j] = members.mean(axis=0)
      if rescale and np.linalg.norm(new[j]) > 0:
        new[j] *= np.linalg.norm(members, axis=1).mean() / np.linalg.norm(new[j])
  fan_in = np.shape(loras[0].down)[0]
  return new[:, :fan_in].T, new[:, fan_in:]


def _lego_adapters(seed):
  """Two rank-2 adapters of the (4, 3) and (2, 3, 2) kernels (k = 3 of 4 units)."""
  rng = np.random.default_rng(seed)
  return [
      {"params": {
          f"k{j}": LoRA(rng.normal(size=(int(np.prod(s[:-1])), 2)).astype(np.float32),
                        rng.normal(size=(2, s[-1])).astype(np.float32))
          for j, s in enumerate(_SHAPES)
      }}
      for _ in range(2)
  ]


@pytest.mark.parametrize("seed, rescale", [(0, True), (1, False), (2, True)])
def test_lego_one_step_matches_numpy(seed, rescale):
  adapters = _lego_adapters(seed)
  key = jax.random.key(seed)
  got = mj.merge.lora_lego(adapters, 3, key=key, iterations=1, rescale=rescale)
  for path in ("params/k0", "params/k1"):
    # The documented start: k distinct units drawn with the leaf's key.
    uniform = jax.random.uniform(mj.merge.leaf_key(key, 0, tuple(path.split("/"))), (4,))
    start = np.argsort(np.asarray(uniform), kind="stable")[:3]
    loras = [dict(_loras(a))[path] for a in adapters]
    down, up = reference_lego_step(loras, start, rescale)
    np.testing.assert_allclose(dict(_loras(got))[path].down, down, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dict(_loras(got))[path].up, up, rtol=1e-5, atol=1e-5)


def test_lego_is_determined_by_its_key_and_leaf_by_leaf():
  adapters = _lego_adapters(3)
  merge = lambda key, ads=adapters: _loras(mj.merge.lora_lego(ads, 3, key=key))
  same, again = merge(jax.random.key(1)), merge(jax.random.key(1))
  others = [merge(jax.random.key(k)) for k in (2, 3, 4)]
  for j, (path, lora) in enumerate(same):
    np.testing.assert_array_equal(lora.down, again[j][1].down)
    assert any(np.any(np.asarray(lora.down) != np.asarray(o[j][1].down)) for o in others)
    one = merge(jax.random.key(1), [_nested(path, dict(_loras(a))[path]) for a in adapters])
    np.testing.assert_array_equal(one[0][1].down, lora.down, err_msg=path)
    np.testing.assert_array_equal(one[0][1].up, lora.up, err_msg=path)


@hypothesis.settings(max_examples=8)  # each example compiles anew
@hypothesis.given(adapter_sets((2, 2, 2)))
def test_reversible_merge_with_a_full_basis_reconstructs_every_task(case):
  _, adapters = case
  merged = mj.merge.reversible_merge(adapters, 3)
  for t, adapter in enumerate(adapters):
    got = mj.merge.reversible_task(merged, t)
    for (path, g), (_, w) in zip(_loras(got), _loras(adapter)):
      np.testing.assert_allclose(g.down, w.down, rtol=1e-5, atol=1e-5, err_msg=path)
      np.testing.assert_allclose(g.up, w.up, rtol=1e-5, atol=1e-5, err_msg=path)


def test_reversible_merge_is_the_best_rank_p_reconstruction():
  rng = np.random.default_rng(4)
  adapters = [
      {"k": LoRA(rng.normal(size=(5, 2)).astype(np.float32),
                 rng.normal(size=(2, 3)).astype(np.float32))}
      for _ in range(4)
  ]
  merged = mj.merge.reversible_merge(adapters, 2)
  assert merged.basis["k"].down.shape == (2, 5, 2) and merged.coefficients["k"].shape == (4, 2)
  tasks = np.stack([np.concatenate([np.ravel(a["k"].down), np.ravel(a["k"].up)]) for a in adapters])
  want = _truncated_svd(tasks, 2)
  for t in range(4):
    got = mj.merge.reversible_task(merged, t)["k"]
    np.testing.assert_allclose(
        np.concatenate([np.ravel(got.down), np.ravel(got.up)]), want[t], rtol=1e-4, atol=1e-4
    )
  # A basis beyond the 4 tasks pads zero directions and reconstructs exactly.
  padded = mj.merge.reversible_merge(adapters, 5)
  np.testing.assert_array_equal(padded.basis["k"].up[4], 0)
  np.testing.assert_allclose(mj.merge.reversible_task(padded, 3)["k"].down, adapters[3]["k"].down,
                             rtol=1e-5, atol=1e-5)
  # The basis directions are orthogonal: the coefficients are least squares.
  flat = np.concatenate([merged.basis["k"].down.reshape(2, -1), merged.basis["k"].up.reshape(2, -1)], 1)
  gram = flat @ flat.T
  np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)


def test_apply_keeps_the_base_dtype_and_scale_zero_is_the_base():
  base = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)}
  adapter = {"w": LoRA(np.ones((4, 1), np.float32), np.ones((1, 3), np.float32))}
  merged = mj.merge.lora_apply(base, adapter)
  assert merged["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(merged["w"], np.float32), 2)
  assert_trees_close(mj.merge.lora_apply(base, adapter, scale=0.0), base, rtol=0, atol=0)


_LORA = LoRA(np.ones((2, 1), np.float32), np.ones((1, 3), np.float32))
_RANK2 = LoRA(np.ones((2, 2), np.float32), np.ones((2, 3), np.float32))
_ONE = {"params": {"dense": {"kernel": _LORA}}}
_KEY = jax.random.key(0)
_MERGES = {
    "lora_sum": lambda ads, **kw: mj.merge.lora_sum(ads, **kw),
    "lora_lego": lambda ads, **kw: mj.merge.lora_lego(ads, kw.pop("rank", 1), key=_KEY, **kw),
    "reversible_merge": lambda ads, **kw: mj.merge.reversible_merge(ads, kw.pop("rank", 1)),
}


@pytest.mark.parametrize("name", sorted(_MERGES))
def test_bad_or_mismatched_adapters_are_named(name):
  merge = _MERGES[name]
  with pytest.raises(ValueError, match="need at least one adapter"):
    merge([])
  missing = {"params": {"other": {"kernel": _LORA}}}
  with pytest.raises(ValueError, match=r"params/dense/kernel/down: in tree 0, not in tree 1"):
    merge([_ONE, missing])
  wider = {"params": {"dense": {"kernel": LoRA(np.ones((2, 1)), np.ones((1, 4)))}}}
  with pytest.raises(ValueError, match=r"adapters\[1\]: params/dense/kernel: \(in, out\) \(2, 4\), but adapters\[0\] has \(2, 3\)"):
    merge([_ONE, wider])
  torn = {"params": {"dense": {"kernel": LoRA(np.ones((2, 2)), np.ones((1, 3)))}}}
  with pytest.raises(ValueError, match=r"adapters\[1\]: params/dense/kernel: down \(2, 2\) and up \(1, 3\) disagree on the rank"):
    merge([_ONE, torn])
  bare = {"params": {"dense": {"kernel": np.ones((2, 3))}}}
  with pytest.raises(ValueError, match=r"adapters\[0\]: params/dense/kernel: ndarray is not a LoRA"):
    merge([bare])


def test_reversible_merge_needs_one_rank_per_leaf():
  with pytest.raises(ValueError, match=r"adapters\[1\]: params/dense/kernel: rank 2, but adapters\[0\] has rank 1"):
    mj.merge.reversible_merge([_ONE, {"params": {"dense": {"kernel": _RANK2}}}], 2)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("lora_sum", {"scale": [1.0, 2.0, 3.0]}, "2 models but 3 scales"),
        ("lora_sum", {"scale": float("nan")}, "scale must be finite"),
        ("lora_lego", {"rank": 0}, "rank must be an integer >= 1"),
        ("lora_lego", {"rank": 3}, "rank 3 is more than the 2 units of params/dense/kernel"),
        ("lora_lego", {"iterations": 0}, "iterations must be an integer >= 1"),
        ("reversible_merge", {"rank": 0}, "num_basis must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_rejected(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _MERGES[name]([_ONE, _ONE], **kwargs)


def test_apply_compress_extract_and_peft_reject_bad_inputs():
  with pytest.raises(ValueError, match="adapter: params/dense/bias is not a leaf of the base"):
    mj.merge.lora_apply(BAD_INPUT_BASE, {"params": {"dense": {"bias": _LORA}}})
  with pytest.raises(ValueError, match=r"adapter: params/dense/kernel: \(in, out\) \(2, 3\) does not fit the base's \(3, 2\)"):
    mj.merge.lora_apply({"params": {"dense": {"kernel": np.zeros((3, 2))}}}, _ONE)
  with pytest.raises(ValueError, match="scale must be finite"):
    mj.merge.lora_apply(BAD_INPUT_BASE, _ONE, scale=float("inf"))
  with pytest.raises(ValueError, match="rank must be an integer >= 1"):
    mj.merge.lora_compress(_ONE, 0)
  with pytest.raises(ValueError, match=r"adapter: params/dense/kernel: down \(2, 1, 1\) and up \(1, 3\) must both be 2-D"):
    mj.merge.lora_compress({"params": {"dense": {"kernel": LoRA(np.ones((2, 1, 1)), np.ones((1, 3)))}}}, 1)
  with pytest.raises(ValueError, match=r"does not match the base: params/dense/kernel: \(2, 3\) vs \(2, 4\)"):
    mj.merge.lora_extract(BAD_INPUT_BASE, {"params": {"dense": {"kernel": np.zeros((2, 4))}}}, 1)
  with pytest.raises(ValueError, match="one r"):
    mj.merge.lora_from_peft(np.ones((2, 5)), np.ones((3, 4)), alpha=8)
  with pytest.raises(ValueError, match="alpha must be finite and non-zero"):
    mj.merge.lora_from_peft(np.ones((2, 5)), np.ones((3, 2)), alpha=0)
  merged = mj.merge.reversible_merge([_ONE, _ONE], 2)
  with pytest.raises(ValueError, match=r"task must be in \[0, 2\)"):
    mj.merge.reversible_task(merged, 2)
  with pytest.raises(ValueError, match=r"coefficients: params/dense/kernel: \(2, 3\), not \[N, 2\]"):
    mj.merge.reversible_task(merged._replace(coefficients={"params": {"dense": {"kernel": np.ones((2, 3))}}}), 0)
