"""Tests for mergejax.models.lm: the zoo's decoder-only language model.

Small widths throughout (each option combination compiles once). The GPT-2
and Llama configurations are checked against NumPy transcriptions of HF's
forward passes, reading our parameters through the module docstring's
correspondence tables (as an importer would), so the tables are tested too.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import models
from mergejax import permute
from mergejax.models import lm
from mergejax.spec import MergeLayout

B, T = 4, 6  # every forward pass here runs on [B, T], so compiled ones are reused
SMALL = dict(embed_dim=8, depth=2, num_heads=4, head_dim=4, max_len=8, mlp_dim=12)
GPT2 = dict(style="gpt2", **SMALL)
LLAMA = dict(style="llama", **SMALL)  # GQA: 2 kv heads for 4 query heads


def _ids(seed=0, batch=B, seq=T):
  return np.random.default_rng(seed).integers(0, 256, (batch, seq)).astype(np.int32)


def _init(cfg, seed=1, scale=0.3):
  """Random variables of the model's shapes (NumPy-filled: nothing to compile)."""
  model = models.build("lm", **cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), _ids())
  rng = np.random.default_rng(seed)
  fill = lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32)  # noqa: E731
  return model, jax.tree.map(fill, shapes)


@functools.cache
def _compiled(items):
  return jax.jit(models.build("lm", **dict(items)).apply)


def _apply(cfg):
  """The jitted apply of `cfg`'s model, one per configuration."""
  return _compiled(tuple(sorted(cfg.items())))


def _count(cfg) -> int:
  """The parameter count, written out from the docstring's tables."""
  c = lm.LMConfig(**cfg)
  d, hd, v = c.embed_dim, c.head_dim, c.vocab_size
  bias = c.use_bias
  norm = d * (2 if c.norm == "layer" and bias else 1)
  total = v * d + (c.max_len * d if c.positions == "learned" else 0) + norm
  for h, kv, f in zip(c.num_heads, c.num_kv_heads, c.mlp_dim):
    qkv = (h + 2 * kv) * hd
    total += 2 * norm + d * qkv + h * hd * d + (qkv + d if bias else 0)
    mats = 3 if c.mlp == "swiglu" else 2
    total += mats * d * f + (((mats - 1) * f + d) if bias else 0)
  return total + (0 if c.tie_embeddings else d * v)


COMBOS = [
    GPT2,
    LLAMA,
    dict(GPT2, positions="rope", norm="rms", mlp="swiglu"),
    dict(LLAMA, positions="learned", norm="layer", mlp="gelu", use_bias=True, tie_embeddings=True),
    dict(GPT2, num_kv_heads=2),  # fused q | k | v of unequal widths
    dict(LLAMA, num_kv_heads=1, fused_qkv=True),  # multi-query, fused
    dict(LLAMA, num_kv_heads=4),  # MHA
    dict(GPT2, scan=True),
    dict(LLAMA, scan=True),
]


@pytest.mark.parametrize("cfg", COMBOS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k not in SMALL))
def test_forward_is_causal_and_counts_parameters(cfg):
  _, variables = _init(cfg)
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == _count(cfg)
  ids = _ids()
  ids[2:] = ids[:2]
  ids[2:, 3] = (ids[2:, 3] + 1) % 256  # examples 2, 3: examples 0, 1 with token 3 changed
  logits = _apply(cfg)(variables, ids)
  assert logits.shape == (B, T, 256) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Causal: changing token 3 changes no logit before position 3, and some after.
  np.testing.assert_allclose(logits[2:, :3], logits[:2, :3], rtol=1e-6, atol=1e-6)
  assert not np.allclose(logits[2:, 3:], logits[:2, 3:])


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_every_parameter_gets_a_gradient(cfg):
  model, variables = _init(cfg)
  ids = _ids()

  def loss(p):
    logits = model.apply({"params": p}, ids[:, :-1])
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0])

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  assert np.isfinite(value)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    if jax.tree_util.keystr(path) == "['pos_embed']":
      g = g[:T - 1]  # positions past the input are not read
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)


# NumPy transcriptions of HF's GPT2LMHeadModel and LlamaForCausalLM, fed
# HF-named weights made from ours by the docstring's tables.


def _np_layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _np_attention(q, k, v, n_rep):
  """q: [b, t, H, hd], k, v: [b, t, KV, hd], HF's repeat_kv then causal softmax attention."""
  k, v = np.repeat(k, n_rep, axis=2), np.repeat(v, n_rep, axis=2)
  t, hd = q.shape[1], q.shape[-1]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", p, v)
  return o.reshape(*o.shape[:2], -1)


def _hf_gpt2(sd, ids, n_layer, n_head):
  gelu_new = lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # noqa: E731
  t = ids.shape[1]
  h = sd["transformer.wte.weight"][ids] + sd["transformer.wpe.weight"][:t]
  for i in range(n_layer):
    w = lambda n: sd[f"transformer.h.{i}.{n}"]  # noqa: E731, B023
    y = _np_layer_norm(h, w("ln_1.weight"), w("ln_1.bias"))
    q, k, v = np.split(y @ w("attn.c_attn.weight") + w("attn.c_attn.bias"), 3, axis=-1)
    q, k, v = (z.reshape(*z.shape[:2], n_head, -1) for z in (q, k, v))
    h = h + _np_attention(q, k, v, 1) @ w("attn.c_proj.weight") + w("attn.c_proj.bias")
    y = _np_layer_norm(h, w("ln_2.weight"), w("ln_2.bias"))
    h = h + gelu_new(y @ w("mlp.c_fc.weight") + w("mlp.c_fc.bias")) @ w("mlp.c_proj.weight") + w("mlp.c_proj.bias")
  h = _np_layer_norm(h, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])
  return h @ sd["lm_head.weight"].T


def _hf_llama(sd, ids, n_layer, n_head, n_kv, theta=10000.0, eps=1e-5):
  rms = lambda x, w: x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w  # noqa: E731
  linear = lambda x, w: x @ w.T  # noqa: E731  (torch Linear: weight [out, in])

  def rotate(x):
    t, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    emb = np.concatenate([np.outer(np.arange(t), inv)] * 2, -1)[None, :, None, :]
    rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)

  h = sd["model.embed_tokens.weight"][ids]
  for i in range(n_layer):
    w = lambda n: sd[f"model.layers.{i}.{n}"]  # noqa: E731, B023
    y = rms(h, w("input_layernorm.weight"))
    q = linear(y, w("self_attn.q_proj.weight")).reshape(*y.shape[:2], n_head, -1)
    k = linear(y, w("self_attn.k_proj.weight")).reshape(*y.shape[:2], n_kv, -1)
    v = linear(y, w("self_attn.v_proj.weight")).reshape(*y.shape[:2], n_kv, -1)
    h = h + linear(_np_attention(rotate(q), rotate(k), v, n_head // n_kv), w("self_attn.o_proj.weight"))
    y = rms(h, w("post_attention_layernorm.weight"))
    gate = linear(y, w("mlp.gate_proj.weight"))
    act = gate / (1 + np.exp(-gate)) * linear(y, w("mlp.up_proj.weight"))
    h = h + linear(act, w("mlp.down_proj.weight"))
  return linear(rms(h, sd["model.norm.weight"]), sd["lm_head.weight"])


def _as_hf_gpt2(params, depth):
  f = lambda x: np.asarray(x, np.float64)  # noqa: E731
  sd = {"transformer.wte.weight": f(params["embed"]["embedding"]),
        "transformer.wpe.weight": f(params["pos_embed"]),
        "transformer.ln_f.weight": f(params["ln_final"]["scale"]),
        "transformer.ln_f.bias": f(params["ln_final"]["bias"])}
  sd["lm_head.weight"] = sd["transformer.wte.weight"]
  ours = {"ln_1": "ln_attn", "ln_2": "ln_mlp", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_out",
          "mlp.c_fc": "mlp_up", "mlp.c_proj": "mlp_down"}
  for i in range(depth):
    for hf, name in ours.items():
      leaf = params[f"block{i}"][name]
      w, b = ("scale", "bias") if hf.startswith("ln") else ("kernel", "bias")
      sd[f"transformer.h.{i}.{hf}.weight"], sd[f"transformer.h.{i}.{hf}.bias"] = f(leaf[w]), f(leaf[b])
  return sd


def _as_hf_llama(params, depth):
  f = lambda x: np.asarray(x, np.float64)  # noqa: E731
  sd = {"model.embed_tokens.weight": f(params["embed"]["embedding"]),
        "model.norm.weight": f(params["ln_final"]["scale"]),
        "lm_head.weight": f(params["lm_head"]["kernel"]).T}
  ours = {"self_attn.q_proj": "attn_query", "self_attn.k_proj": "attn_key", "self_attn.v_proj": "attn_value",
          "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_gate", "mlp.up_proj": "mlp_up",
          "mlp.down_proj": "mlp_down"}
  for i in range(depth):
    blk = params[f"block{i}"]
    sd[f"model.layers.{i}.input_layernorm.weight"] = f(blk["ln_attn"]["scale"])
    sd[f"model.layers.{i}.post_attention_layernorm.weight"] = f(blk["ln_mlp"]["scale"])
    for hf, name in ours.items():
      sd[f"model.layers.{i}.{hf}.weight"] = f(blk[name]["kernel"]).T
  return sd


def test_gpt2_and_llama_configurations_compute_hf_forward_passes():
  ids = _ids()
  model, variables = _init(GPT2)
  sd = _as_hf_gpt2(variables["params"], GPT2["depth"])
  assert len(sd) == 5 + 12 * GPT2["depth"]  # every leaf has an HF name (and lm_head is wte)
  np.testing.assert_allclose(_apply(GPT2)(variables, ids), _hf_gpt2(sd, ids, 2, 4), rtol=1e-4, atol=1e-4)
  model, variables = _init(LLAMA)
  sd = _as_hf_llama(variables["params"], LLAMA["depth"])
  assert len(jax.tree.leaves(variables)) == len(sd)
  np.testing.assert_allclose(_apply(LLAMA)(variables, ids), _hf_llama(sd, ids, 2, 4, 2), rtol=1e-4,
                             atol=1e-4)


# Specs: hand specs are sound and equal the traced ones.


@pytest.mark.parametrize("cfg", [GPT2, LLAMA, dict(LLAMA, positions="learned")], ids=["gpt2", "llama", "llama-learned"])
def test_hand_and_traced_specs_are_sound_and_agree(cfg):
  model, variables = _init(cfg)
  ids = _ids()
  hand = models.permutation_spec("lm", variables, **cfg)
  assert hand.names == tuple(models.groups("lm", **cfg))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    traced = mj.permutation_spec(model.apply, variables, ids)
  as_sets = lambda s: {(s.sizes[g], frozenset(r)) for g, r in s.groups.items() if r}  # noqa: E731
  assert as_sets(hand) == as_sets(traced)
  apply = _apply(cfg)
  out = apply(variables, ids)
  for spec, seed in ((hand, 0), (traced, 1)):
    perm = permute.random_permutation(spec, jax.random.key(seed))
    permuted = permute.apply_permutation(spec, perm, variables)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(permuted)))
    np.testing.assert_allclose(apply(permuted, ids), out, rtol=1e-4, atol=1e-4)
  # Every leaf is in a group.
  referenced = {r.path for refs in hand.groups.values() for r in refs}
  assert referenced == set(mj.tree.leaves_by_path(variables))


def test_groups_of_each_configuration():
  assert list(models.groups("lm", **dict(GPT2, depth=1))) == [
      "embed", "block0.heads", "block0.qk_dim", "block0.vo_dim", "block0.mlp"]
  # GQA: kv heads and the queries per kv head; RoPE fixes q/k's units.
  assert models.groups("lm", **dict(LLAMA, depth=1)) == {
      "embed": 8, "block0.kv_heads": 2, "block0.q_per_kv": 2, "block0.vo_dim": 4, "block0.mlp": 12}
  # Never widened: head_dim, and the queries per kv head (the kv heads carry them).
  assert models.config("lm", **LLAMA).fixed_groups() == {
      "block0.vo_dim", "block1.vo_dim", "block0.q_per_kv", "block1.q_per_kv"}
  assert "lm" in models.names()


def test_scanned_hand_spec_is_the_stream_and_a_batched_group_per_block_group_and_sound():
  cfg = dict(LLAMA, scan=True)
  model, variables = _init(cfg)
  spec = models.permutation_spec("lm", variables, **cfg)
  assert spec.names == ("embed", "blocks.kv_heads", "blocks.q_per_kv", "blocks.vo_dim", "blocks.mlp")
  assert spec.sizes == models.groups("lm", **cfg)  # the layouts' names (a merge's layout builds the model)
  assert spec.batch_sizes == {g: 2 for g in spec.names[1:]}  # one permutation per layer
  assert {r.axis for r in spec.groups["embed"] if r.path[1] == "blocks"} == {1, 2}
  assert all(r.batch == 0 for g in spec.names[1:] for r in spec.groups[g])
  perm = permute.random_permutation(spec, jax.random.key(0))
  apply = _apply(cfg)
  np.testing.assert_allclose(apply(permute.apply_permutation(spec, perm, variables), _ids()),
                             apply(variables, _ids()), rtol=1e-4, atol=1e-4)


# Layouts.


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_build_follows_the_layout(cfg):
  sizes = models.groups("lm", **cfg)
  fixed = models.config("lm", **cfg).fixed_groups()
  ratios = dict(zip(sizes, np.linspace(0.0, 1.0, len(sizes))))
  layout = MergeLayout.from_ratios(sizes, {g: 1.0 if g in fixed else r for g, r in ratios.items()})
  w = layout.widths()
  shapes = jax.eval_shape(models.build("lm", layout, **cfg).init, jax.random.key(0), _ids())["params"]
  assert shapes["embed"]["embedding"].shape == (256, w["embed"])
  hd = cfg["head_dim"]
  for i in range(cfg["depth"]):
    blk = shapes[f"block{i}"]
    if cfg["style"] == "gpt2":
      heads = kv = w[f"block{i}.heads"]
      assert blk["attn_qkv"]["kernel"].shape == (w["embed"], 3 * heads * hd)
    else:
      kv = w[f"block{i}.kv_heads"]
      heads = kv * w[f"block{i}.q_per_kv"]
      assert blk["attn_key"]["kernel"].shape == (w["embed"], kv * hd)
      assert blk["mlp_gate"]["kernel"].shape == (w["embed"], w[f"block{i}.mlp"])
    assert blk["attn_out"]["kernel"].shape == (heads * hd, w["embed"])
    assert blk["mlp_down"]["kernel"].shape == (w[f"block{i}.mlp"], w["embed"])
  assert any(w[g] > n for g, n in sizes.items())  # something was widened


def test_layouts_that_widen_head_dim_or_unbalance_a_scan_are_refused():
  for cfg, group in ((GPT2, "block0.qk_dim"), (GPT2, "block1.vo_dim"), (LLAMA, "block0.vo_dim"),
                     (LLAMA, "block0.q_per_kv")):
    n = models.groups("lm", **cfg)[group]
    layout = {**MergeLayout.identity(models.groups("lm", **cfg)), group: (n - 1, 1, 1)}
    with pytest.raises(ValueError, match=f"'{group}' is never widened"):
      models.build("lm", layout, **cfg)
  # Scanned: one GroupLayout per `blocks.X` for every layer, the names of the scanned spec's batched groups.
  cfg = dict(GPT2, scan=True)
  sizes = models.groups("lm", **cfg)
  assert sizes == {"embed": 8, "blocks.heads": 4, "blocks.qk_dim": 4, "blocks.vo_dim": 4, "blocks.mlp": 12}
  assert models.config("lm", **dict(LLAMA, scan=True)).fixed_groups() == {"blocks.vo_dim", "blocks.q_per_kv"}
  layout = {**MergeLayout.identity(sizes), "blocks.mlp": (6, 6, 6)}
  assert models.build("lm", layout, **cfg).mlp_dims == (18, 18)
  unrolled = {**MergeLayout.identity(models.groups("lm", **GPT2)), "block0.mlp": (6, 6, 6)}
  with pytest.raises(ValueError, match=r"missing \['blocks.heads', .*unknown \['block0.heads'"):
    models.build("lm", unrolled, **cfg)
  with pytest.raises(ValueError, match="'blocks.qk_dim' is never widened"):
    models.build("lm", {**layout, "blocks.qk_dim": (3, 1, 1)}, **cfg)


# Scan.


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_scanned_model_computes_the_unrolled_one(cfg):
  model, variables = _init(cfg)
  stacked = lm.stack_layers(variables)
  assert stacked["params"]["blocks"]["mlp_down"]["kernel"].shape == (2, 12, 8)
  assert not any(k.startswith("block") and k != "blocks" for k in stacked["params"])
  scanned = models.build("lm", **dict(cfg, scan=True))
  shapes = jax.eval_shape(scanned.init, jax.random.key(0), _ids())
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(lambda s: s.shape, shapes)
  np.testing.assert_allclose(_apply(dict(cfg, scan=True))(stacked, _ids()), _apply(cfg)(variables, _ids()),
                             rtol=1e-5, atol=1e-5)
  back = lm.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_stack_layers_refuses_blocks_that_differ():
  _, variables = _init(dict(GPT2, mlp_dim=(12, 10)))
  with pytest.raises(ValueError, match="block1 differs"):
    lm.stack_layers(variables)


# Configs and inputs.


@pytest.mark.parametrize("cfg,message", [
    (dict(style="bert"), "style must be one of 'gpt2', 'llama'"),
    (dict(num_heads=4, num_kv_heads=3), r"num_kv_heads\[0\] = 3 does not divide num_heads\[0\] = 4"),
    (dict(positions="alibi"), "positions must be one of"),
    (dict(norm="batch"), "norm must be one of"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(style="llama", head_dim=3), "head_dim must be even with RoPE"),
    (dict(num_classes=10), "num_classes is the vocabulary"),
    (dict(fused_qkv=1), "fused_qkv must be a bool"),
    (dict(depth=2, mlp_dim=(8, 8, 8)), "mlp_dim has 3 entries, expected 2"),
    (dict(scan=True, num_heads=(4, 2)), "scan=True needs the same"),
    (dict(rope_base=0.5), "rope_base"),
])
def test_bad_configs_are_refused(cfg, message):
  with pytest.raises(ValueError, match=message):
    models.build("lm", **cfg)


def test_bad_inputs_are_refused():
  model = models.build("lm", **GPT2)
  with pytest.raises(ValueError, match="token ids"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 4), jnp.float32))
  with pytest.raises(ValueError, match="9 tokens exceed the position table's max_len 8"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 9), jnp.int32))
