"""Merges of attention models: the zoo's ViT and LM (GPT-2 and Llama layouts).

Matching recovers a permuted copy; PLeaS and ZipIt! of a model with a
permuted copy of itself give the model back at budget 1.0 (GPT-2's fused
q | k | v laid out part by part); at budget 2.0 the norms over the widened
residual stream see both models' units (DESIGN.md, Norms over a widened
group), which is checked exactly; REPAIR and the per-token Fisher of an LM.
Tiny models, one layer, short sequences.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import models

LM = dict(embed_dim=8, depth=1, num_heads=4, head_dim=4, max_len=6, mlp_dim=8)
CASES = {
    "vit": ("vit", dict(patch_size=4, embed_dim=8, depth=1, num_heads=2, head_dim=4, mlp_dim=8, num_classes=3)),
    "gpt2": ("lm", dict(style="gpt2", **LM)),  # fused q | k | v: AxisRef parts
    "llama": ("lm", dict(style="llama", **LM)),  # GQA: 2 kv heads of 2 queries, RoPE, RMSNorm
    "llama-mqa": ("lm", dict(style="llama", **dict(LM, num_heads=2))),  # one kv head: a group no leaf names
}


MESH = jax.sharding.Mesh(jax.devices()[:1], ("data",))  # one device: less to compile


def _x(zoo, n=8):
  rng = np.random.default_rng(0)
  if zoo == "vit":
    return rng.standard_normal((n, 8, 8, 3)).astype(np.float32)
  return rng.integers(0, 256, (n, 6)).astype(np.int32)


@functools.cache
def _case(name, seed=1):
  """(zoo name, config, model, x, va, spec, a permuted copy of va, jitted apply of any layout)."""
  zoo, cfg = CASES[name]
  model = models.build(zoo, **cfg)
  x = _x(zoo)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  va = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  spec = models.permutation_spec(zoo, va, **cfg)
  copy = mj.apply_permutation(spec, mj.random_permutation(spec, jax.random.key(seed)), va)
  return zoo, cfg, model, x, va, spec, copy


@functools.cache
def _apply(zoo, layout_items, cfg_items):
  layout = mj.MergeLayout(dict(layout_items)) if layout_items else None
  return jax.jit(models.build(zoo, layout, **dict(cfg_items)).apply)


def _run(zoo, cfg, layout, variables, x):
  """The model built from `layout` (None: the original) on `variables`."""
  items = tuple(sorted((g, tuple(v)) for g, v in layout.items())) if layout is not None else None
  return _apply(zoo, items, tuple(sorted(cfg.items())))(variables, x)


def _close(a, b, tol=1e-4):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["vit", "gpt2", "llama"])
def test_matching_recovers_a_permuted_copy(name):
  zoo, cfg, model, x, va, spec, copy = _case(name)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(va), jax.tree.leaves(copy)))
  _close(_run(zoo, cfg, None, copy, x), _run(zoo, cfg, None, va, x))  # permuted model = same function
  results = [mj.weight_matching(spec, va, copy)]
  if name != "vit":  # (the ViT's activations are matched by ZipIt!'s correlations below)
    results.append(mj.activation_matching(spec, model.apply, va, copy, [x], mesh=MESH, progress=False))
  for result in results:
    aligned = mj.apply_permutation(spec, result.perm, copy)
    for a, b in zip(jax.tree.leaves(aligned), jax.tree.leaves(va)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,fit", [("gpt2", True), ("llama", False), ("vit", False)])
def test_pleas_at_budget_one_of_a_permuted_copy_is_the_model(name, fit):
  zoo, cfg, model, x, va, spec, copy = _case(name)
  merged, layout, report = mj.merge.pleas(model.apply, va, copy, [x], budget=1.0, spec=spec, mesh=MESH,
                                          least_squares_fit=fit, progress=False, report=True)
  assert all(g.n_a == g.n_b == 0 for g in layout.values())
  if fit:  # the fused kernel is solved part by part, q | k | v: 3 x 4 heads x 4 units, all merged
    (qkv,) = [r for r in report.layers if r.path[-2] == "attn_qkv"]
    assert qkv.blocks == (48, 0, 0) and qkv.residual_after < 1e-5
  _close(_run(zoo, cfg, layout, merged, x), _run(zoo, cfg, None, va, x), 1e-3)


@pytest.mark.parametrize("name", ["vit", "gpt2", "llama", "llama-mqa"])
def test_zipit_of_a_permuted_copy_is_the_model(name):
  zoo, cfg, model, x, va, spec, copy = _case(name)
  merged, layout, alloc = mj.merge.zipit(model.apply, va, copy, [x], budget=1.0, spec=spec, mesh=MESH, progress=False)
  assert alloc.cost == pytest.approx(1.0) and all(g.width == spec.sizes[n] for n, g in layout.items())
  _close(_run(zoo, cfg, layout, merged, x), _run(zoo, cfg, None, va, x))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_budget_two_widens_heads_not_head_dim_and_the_norms_see_both_models(name):
  zoo, cfg, model, x, va, spec, copy = _case(name)
  _, _, _, _, vb, _, _ = _case(name, seed=2)
  merged, layout = mj.merge.pleas(model.apply, va, vb, [x], budget=2.0, spec=spec, least_squares_fit=False, grid=(0.0,),
                                  progress=False)
  # head_dim is never widened; with GQA neither are the queries per kv head (each widened kv head
  # carries its own model's group of queries), so only whole heads and kv heads widen.
  never = {g for g in spec.groups if g.endswith(("qk_dim", "vo_dim", "q_per_kv"))}
  assert all((g.width == spec.sizes[n]) if n in never else (g.n_merged == 0) for n, g in layout.items())
  vb = mj.apply_permutation(spec, mj.weight_matching(spec, va, vb, key=jax.random.key(0)).perm, vb)  # as PLeaS
  # The first norm reads [x_A | x_B] and normalises over all 2d units: its output, which every
  # q/k/v kernel reads, is [x_A s_A | x_B s_B] / rms (RMSNorm), or LayerNorm's centred form.
  first = "attn_qkv" if cfg["style"] == "gpt2" else "attn_query"
  _, got = mj.capture(models.build(zoo, layout, **cfg).apply)(merged, x)
  streams, scales, biases = [], [], []
  for v in (va, vb):
    p = v["params"]
    e = np.asarray(p["embed"]["embedding"])[x]
    if "pos_embed" in p:
      e = e + np.asarray(p["pos_embed"])[:x.shape[1]]
    streams.append(e)
    scales.append(np.asarray(p["block0"]["ln_attn"]["scale"]))
    biases.append(np.asarray(p["block0"]["ln_attn"].get("bias", np.zeros_like(scales[-1]))))
  h = np.concatenate(streams, -1).astype(np.float64)
  if cfg["style"] == "gpt2":
    h = h - h.mean(-1, keepdims=True)
  want = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-5) * np.concatenate(scales) + np.concatenate(biases)
  _close(got[("params", "block0", first, "kernel")], want, 1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-mqa"])
def test_budget_two_of_a_permuted_copy_is_the_model(name):
  """Both halves of every norm's input are the same units: the norms see one model's statistics."""
  zoo, cfg, model, x, va, spec, copy = _case(name)
  cfg = dict(cfg, tie_embeddings=False)  # a tied head sums both models' logits (DESIGN.md), not their mean
  model = models.build(zoo, **cfg)
  rng = np.random.default_rng(3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  va = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  spec = models.permutation_spec(zoo, va, **cfg)
  copy = mj.apply_permutation(spec, mj.random_permutation(spec, jax.random.key(4)), va)
  merged, layout = mj.merge.pleas(model.apply, va, copy, [x], budget=2.0, spec=spec, least_squares_fit=False, grid=(0.0,),
                                  progress=False)
  assert layout["embed"].n_merged == 0
  if name == "llama-mqa":  # one kv head cannot widen: the query heads do, all reading it
    assert layout["block0.kv_heads"].width == 1 and layout["block0.q_per_kv"].n_merged == 0
  _close(_run(zoo, cfg, layout, merged, x), _run(zoo, cfg, None, va, x))


def test_repair_restores_a_rescaled_layer_and_refuses_bias_free_models():
  zoo, cfg, model, x, va, spec, copy = _case("gpt2")
  aligned = mj.apply_permutation(spec, mj.weight_matching(spec, va, copy).perm, copy)
  up = ("params", "block0", "mlp_up", "kernel")
  broken = mj.tree.replace_leaves(va, {up: 2 * mj.tree.leaves_by_path(va)[up]})
  repaired = mj.repair.repair(spec, model.apply, va, aligned, broken, [x])
  for a, b in zip(jax.tree.leaves(repaired), jax.tree.leaves(va)):
    _close(a, b, 2e-3)
  zoo, cfg, model, x, va, spec, copy = _case("llama")
  vb = _case("llama", seed=2)[4]
  with pytest.raises(ValueError, match="no sibling bias"):
    mj.repair.repair(spec, model.apply, va, vb, mj.tree.lerp(va, vb, 0.5), [x])


def test_the_fisher_of_a_language_model_is_the_per_token_mean():
  zoo, cfg, model, x, va, spec, copy = _case("gpt2")
  ids, labels = x[:3, :-1], x[:3, 1:]  # next-token labels, one per position
  empirical = mj.fisher(model.apply, va, [(ids, labels)], kind="empirical", mesh=MESH, progress=False)

  def log_p(params, seq, t, y):  # one token's log-likelihood given the data prefix
    return jax.nn.log_softmax(model.apply({"params": params}, seq[None])[0, t])[y]

  t = np.arange(ids.shape[1])
  per_token = jax.jit(jax.vmap(jax.vmap(jax.grad(log_p), (None, None, 0, 0)), (None, 0, None, 0)))
  grads = per_token(va["params"], ids, t, labels)  # [3, 5, ...]: every example and position
  want = jax.tree.map(lambda g: np.mean(np.square(np.asarray(g, np.float64)), (0, 1)), grads)
  for path, f in mj.tree.leaves_by_path(want).items():
    got = mj.tree.leaves_by_path(empirical["params"])[path]
    np.testing.assert_allclose(got, f, rtol=1e-3, atol=1e-7 + 1e-3 * np.abs(f).max())
  sampled = mj.fisher(model.apply, va, [ids], kind="sampled", key=jax.random.key(0), mesh=MESH, progress=False)
  again = mj.fisher(model.apply, va, [ids[:2], ids[2:]], kind="sampled", key=jax.random.key(0), mesh=MESH, progress=False)
  for a, b in zip(jax.tree.leaves(sampled), jax.tree.leaves(again)):
    _close(a, b, 1e-5)
  with pytest.raises(ValueError, match=r"labels must be int\[3, 5\]"):
    mj.fisher(model.apply, va, [(ids, labels[:, 0])], kind="empirical", mesh=MESH, progress=False)
