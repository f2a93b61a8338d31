"""Traced specs of transformers as people write them (issue 14).

Each construct is built in plain jax.numpy and in Flax, and checked twice:
soundness (a random permutation from the traced spec leaves the outputs
unchanged) and completeness (the exact groups expected: the residual stream
through the embedding table, q/k/v heads across a fused projection split in
three, head_dim groups per dot product, GQA's (kv_heads, n_rep) heads, RoPE's
fixed q/k head_dim). A fused projection reshaped to (3, heads, head_dim) and
indexed, unstacked or moved and unpacked gives the spec of the same projection
cut by `jnp.split`. The one warning names exactly the constructs that fixed
variable axes.

Speed: variables are NumPy arrays filled from `jax.eval_shape` (no init is
compiled), permutations are NumPy's, forward passes run eagerly (each
operation compiles once for the whole file, no model is compiled whole), and
the split forms' specs are module-scoped fixtures that the other forms are
compared with.
"""

import math
import warnings

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mergejax import permute
from mergejax import trace
from mergejax.spec import AxisRef

V, L, T, B = 11, 7, 5, 2  # vocabulary, position table, tokens, batch
D, H, HD, F = 8, 2, 4, 12  # width, heads, head_dim, MLP hidden


def _as_sets(spec) -> set[tuple[int, frozenset]]:
  return {(spec.sizes[g], frozenset(refs)) for g, refs in spec.groups.items()}


def _ref(*path, axis, factor=None, part=None):
  return AxisRef(tuple(str(p) for p in path), axis, factor, part)


def _traced(fn, variables, *args):
  """The spec, with every warning turned into an error."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    return trace.permutation_spec(fn, variables, *args)


def _assert_invariant(fn, variables, spec, *args, seed=0):
  """A random permutation from `spec` changes the variables, not the outputs."""
  assert not spec.batch_sizes
  rng = np.random.default_rng(seed)
  perm = {g: rng.permutation(n) for g, n in spec.sizes.items()}
  variables = jax.tree.map(np.asarray, variables)
  permuted = permute.apply_permutation(spec, perm, variables)
  out, out_p = fn(variables, *args), fn(permuted, *args)  # eager: ops compiled once for the whole file
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_p)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(permuted))]
  assert any(changed)


def _weights(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s) / math.sqrt(s[0])).astype(np.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def _random_like(shapes, seed=0):
  """NumPy arrays of the shapes of a `jax.eval_shape` tree, scaled by their first axis."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / math.sqrt(s.shape[0])).astype(np.float32), shapes)


def _ids(seed=1):
  return np.random.default_rng(seed).integers(0, V, (B, T)).astype(np.int32)


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _rms_norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * scale


def _causal_attention(q, k, v):
  """q: [b, t, heads, hd], k, v: [b, t, heads, hd] -> [b, t, heads * hd]."""
  t = q.shape[1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
  out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
  return out.reshape(*out.shape[:2], -1)


# GPT-2: learned positions, fused c_attn split in three, tied head.

def _gpt2_params(num_blocks=2, seed=0):
  block = dict(ln1_g=(D,), ln1_b=(D,), c_attn_w=(D, 3 * D), c_attn_b=(3 * D,), c_proj_w=(D, D),
               c_proj_b=(D,), ln2_g=(D,), ln2_b=(D,), fc_w=(D, F), fc_b=(F,), proj_w=(F, D), proj_b=(D,))
  return _weights({"wte": (V, D), "wpe": (L, D), "blocks": [block] * num_blocks, "ln_f_g": (D,),
                   "ln_f_b": (D,)}, seed)


def _as_qkv(qkv, form="split"):
  """A fused projection's output [b, t, 3 * H * HD] as q, k, v: [b, t, H, HD], in one of the forms people write."""
  b, t = qkv.shape[:2]
  if form == "split":
    return [z.reshape(b, t, H, HD) for z in jnp.split(qkv, 3, axis=-1)]
  qkv = qkv.reshape(b, t, 3, H, HD)
  if form == "index":
    return qkv[:, :, 0], qkv[:, :, 1], qkv[..., 2, :, :]
  if form == "moveaxis":  # unpacked: a slice and squeeze per part
    return list(jnp.moveaxis(qkv, 2, 0))
  if form == "unstack":
    return jnp.unstack(qkv, axis=2)
  assert form == "transpose"  # [3, b, heads, t, hd], as timm and big_vision lay it out
  qkv = qkv.transpose(2, 0, 3, 1, 4)
  return [z.transpose(0, 2, 1, 3) for z in (qkv[0], qkv[1], qkv[2])]


FUSED_FORMS = ["index", "moveaxis", "unstack", "transpose"]


def _gpt2(params, ids, take="take", qkv="split"):
  t = ids.shape[1]
  wte = params["wte"]
  h = (jnp.take(wte, ids, axis=0) if take == "take" else wte[ids]) + params["wpe"][:t]
  for blk in params["blocks"]:
    y = _layer_norm(h, blk["ln1_g"], blk["ln1_b"])
    q, k, v = _as_qkv(y @ blk["c_attn_w"] + blk["c_attn_b"], qkv)
    h = h + _causal_attention(q, k, v) @ blk["c_proj_w"] + blk["c_proj_b"]
    y = _layer_norm(h, blk["ln2_g"], blk["ln2_b"])
    h = h + jax.nn.gelu(y @ blk["fc_w"] + blk["fc_b"]) @ blk["proj_w"] + blk["proj_b"]
  return _layer_norm(h, params["ln_f_g"], params["ln_f_b"]) @ wte.T


def _gpt2_expected(num_blocks=2):
  heads, within = ((H, HD), 0), ((H, HD), 1)
  q, k, v = (0, D), (D, 2 * D), (2 * D, 3 * D)
  stream = [_ref("wte", axis=1), _ref("wpe", axis=1), _ref("ln_f_g", axis=0), _ref("ln_f_b", axis=0)]
  out = []
  for i in range(num_blocks):
    b = ("blocks", i)
    stream += [_ref(*b, n, axis=0) for n in ("ln1_g", "ln1_b", "c_attn_w", "c_proj_b", "ln2_g", "ln2_b", "fc_w",
                                            "proj_b")]
    stream += [_ref(*b, "c_proj_w", axis=1), _ref(*b, "proj_w", axis=1)]
    qkv = [(n, a) for n, a in (("c_attn_w", 1), ("c_attn_b", 0))]
    out.append((H, frozenset([_ref(*b, n, axis=a, factor=heads, part=p) for n, a in qkv for p in (q, k, v)]
                           + [_ref(*b, "c_proj_w", axis=0, factor=heads)])))
    out.append((HD, frozenset([_ref(*b, n, axis=a, factor=within, part=p) for n, a in qkv for p in (q, k)])))
    out.append((HD, frozenset([_ref(*b, n, axis=a, factor=within, part=v) for n, a in qkv]
                            + [_ref(*b, "c_proj_w", axis=0, factor=within)])))
    out.append((F, frozenset([_ref(*b, "fc_w", axis=1), _ref(*b, "fc_b", axis=0), _ref(*b, "proj_w", axis=0)])))
  return {(D, frozenset(stream)), *out}


@pytest.mark.parametrize("take,qkv", [("take", "split"), ("index", "split"), ("take", "index")])
def test_gpt2_block_plain_jnp(take, qkv):
  """Complete: the exact groups; a c_attn reshaped to (3, heads, hd) and indexed gives those of its split."""
  params, ids = _gpt2_params(), _ids()
  fn = lambda p, x: _gpt2(p, x, take, qkv)
  spec = _traced(fn, params, ids)
  assert _as_sets(spec) == _gpt2_expected()
  _assert_invariant(fn, params, spec, ids)


# Llama: GQA with repeat_kv (broadcast + reshape), RoPE, RMSNorm, SwiGLU, untied head.

QH, KV, QHD = 4, 2, 4  # query heads, kv heads, head_dim


def _llama_params(num_blocks=2, seed=0):
  block = dict(rms1=(D,), wq=(D, QH * QHD), wk=(D, KV * QHD), wv=(D, KV * QHD), wo=(QH * QHD, D), rms2=(D,),
               w_gate=(D, F), w_up=(D, F), w_down=(F, D))
  return _weights({"embed": (V, D), "blocks": [block] * num_blocks, "norm": (D,), "lm_head": (D, V)}, seed)


def _rope(x):
  """x: [b, t, heads, hd], rotated by position (rotate-half, as HF Llama)."""
  t, hd = x.shape[1], x.shape[-1]
  freqs = 1.0 / (10000 ** (jnp.arange(0, hd, 2) / hd))
  angles = jnp.arange(t)[:, None] * freqs[None, :]
  angles = jnp.concatenate([angles, angles], -1)[None, :, None, :]
  x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
  return x * jnp.cos(angles) + jnp.concatenate([-x2, x1], -1) * jnp.sin(angles)


def _repeat_kv(x, n_rep):
  """[b, t, kv, hd] -> [b, t, kv * n_rep, hd], kv-major (HF's repeat_kv)."""
  b, t, kv, hd = x.shape
  return jnp.broadcast_to(x[:, :, :, None, :], (b, t, kv, n_rep, hd)).reshape(b, t, kv * n_rep, hd)


def _llama(params, ids, rope=True):
  h = params["embed"][ids]
  for blk in params["blocks"]:
    y = _rms_norm(h, blk["rms1"])
    q = (y @ blk["wq"]).reshape(*y.shape[:2], QH, QHD)
    k = (y @ blk["wk"]).reshape(*y.shape[:2], KV, QHD)
    v = (y @ blk["wv"]).reshape(*y.shape[:2], KV, QHD)
    if rope:
      q, k = _rope(q), _rope(k)
    k, v = _repeat_kv(k, QH // KV), _repeat_kv(v, QH // KV)
    h = h + _causal_attention(q, k, v) @ blk["wo"]
    y = _rms_norm(h, blk["rms2"])
    h = h + (jax.nn.silu(y @ blk["w_gate"]) * (y @ blk["w_up"])) @ blk["w_down"]
  return _rms_norm(h, params["norm"]) @ params["lm_head"]


def _llama_expected(num_blocks=2, rope=True):
  n_rep = QH // KV
  kv_q, rep_q, hd_q = ((KV, n_rep * QHD), 0), ((KV, n_rep, QHD), 1), ((QH, QHD), 1)
  kv_kv, hd_kv = ((KV, QHD), 0), ((KV, QHD), 1)
  stream = [_ref("embed", axis=1), _ref("norm", axis=0), _ref("lm_head", axis=0)]
  out = []
  for i in range(num_blocks):
    b = ("blocks", i)
    stream += [_ref(*b, n, axis=0) for n in ("rms1", "wq", "wk", "wv", "rms2", "w_gate", "w_up")]
    stream += [_ref(*b, "wo", axis=1), _ref(*b, "w_down", axis=1)]
    out.append((KV, frozenset([_ref(*b, "wq", axis=1, factor=kv_q), _ref(*b, "wk", axis=1, factor=kv_kv),
                               _ref(*b, "wv", axis=1, factor=kv_kv), _ref(*b, "wo", axis=0, factor=kv_q)])))
    out.append((n_rep, frozenset([_ref(*b, "wq", axis=1, factor=rep_q), _ref(*b, "wo", axis=0, factor=rep_q)])))
    out.append((QHD, frozenset([_ref(*b, "wv", axis=1, factor=hd_kv), _ref(*b, "wo", axis=0, factor=hd_q)])))
    if not rope:
      out.append((QHD, frozenset([_ref(*b, "wq", axis=1, factor=hd_q), _ref(*b, "wk", axis=1, factor=hd_kv)])))
    out.append((F, frozenset([_ref(*b, n, axis=1) for n in ("w_gate", "w_up")] + [_ref(*b, "w_down", axis=0)])))
  return {(D, frozenset(stream)), *out}


@pytest.mark.parametrize("rope", [True, False])
def test_llama_block_plain_jnp(rope):
  params, ids = _llama_params(), _ids()
  fn = lambda p, x: _llama(p, x, rope)
  spec = _traced(fn, params, ids)
  assert _as_sets(spec) == _llama_expected(rope=rope)
  _assert_invariant(fn, params, spec, ids)


def _fused_block(p, x, form):
  """Attention from a fused q/k/v kernel and SwiGLU from a fused gate/up kernel, both in `form`."""
  q, k, v = _as_qkv(x @ p["qkv"], form)
  h = x + _causal_attention(q, k, v) @ p["o"]
  gate_up = h @ p["gate_up"]
  if form == "split":
    gate, up = jnp.split(gate_up, 2, axis=-1)
  elif form in ("index", "transpose"):
    gate_up = gate_up.reshape(B, T, 2, F)
    gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
  elif form == "moveaxis":
    gate, up = jnp.moveaxis(gate_up.reshape(B, T, 2, F), 2, 0)
  else:
    gate, up = jnp.unstack(gate_up.reshape(B, T, 2, F), axis=2)
  return h + (jax.nn.silu(gate) * up) @ p["down"]


@pytest.fixture(scope="module")
def fused_block():
  """(variables, x, the spec of the split form)."""
  params = _weights({"qkv": (D, 3 * H * HD), "o": (H * HD, D), "gate_up": (D, 2 * F), "down": (F, D)})
  x = np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)
  return params, x, _traced(lambda p, x: _fused_block(p, x, "split"), params, x)


def test_fused_qkv_and_gate_up_split_groups(fused_block):
  """The split form's groups, exactly: heads across q, k, v; q/k head_dim; v/o head_dim; gate/up units."""
  params, x, spec = fused_block
  heads, within = ((H, HD), 0), ((H, HD), 1)
  q, k, v = (0, H * HD), (H * HD, 2 * H * HD), (2 * H * HD, 3 * H * HD)
  assert _as_sets(spec) == {
      (H, frozenset([_ref("qkv", axis=1, factor=heads, part=p) for p in (q, k, v)]
                    + [_ref("o", axis=0, factor=heads)])),
      (HD, frozenset([_ref("qkv", axis=1, factor=within, part=p) for p in (q, k)])),
      (HD, frozenset([_ref("qkv", axis=1, factor=within, part=v), _ref("o", axis=0, factor=within)])),
      (F, frozenset([_ref("gate_up", axis=1, part=(0, F)), _ref("gate_up", axis=1, part=(F, 2 * F)),
                     _ref("down", axis=0)])),
  }
  _assert_invariant(lambda p, x: _fused_block(p, x, "split"), params, spec, x)


@pytest.mark.parametrize("form", FUSED_FORMS)
def test_fused_qkv_reshaped_and_indexed_as_split(form, fused_block):
  """[embed, 3 * heads * hd] viewed as (3, heads, hd) and indexed (gate/up as (2, hidden)): the split's spec."""
  params, x, split_spec = fused_block
  fn = lambda p, x: _fused_block(p, x, form)
  spec = _traced(fn, params, x)
  assert spec == split_spec
  assert len(spec.groups) == 4
  _assert_invariant(fn, params, spec, x, seed=1)


def test_fused_qkv_reshaped_out_of_sight_is_coarser_and_named(fused_block):
  """A reshape whose value leaves its jaxpr (a jitted helper) is indexed as a whole: sound, coarser, warned."""
  params, x, _ = fused_block
  to_heads = jax.jit(lambda y: y.reshape(B, T, 3, H, HD))

  def fn(p, x):
    qkv = to_heads(x @ p["qkv"])
    return x + _causal_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]) @ p["o"]

  params = {k: params[k] for k in ("qkv", "o")}
  report = trace.spec_report(fn, params, x)
  assert report.fixed_by == {trace._INDEXED_WHOLE: (("qkv",),)}
  with pytest.warns(UserWarning, match=r"an index of a reshaped axis not read as parts .* fixed axes of qkv\.") \
      as record:
    assert trace.permutation_spec(fn, params, x) == report.spec
  assert len(record) == 1
  # One head_dim group for q, k, v and o where the split gives two.
  assert _as_sets(report.spec) == {
      (H, frozenset([_ref("qkv", axis=1, factor=((3, H, HD), 1)), _ref("o", axis=0, factor=((H, HD), 0))])),
      (HD, frozenset([_ref("qkv", axis=1, factor=((3 * H, HD), 1)), _ref("o", axis=0, factor=((H, HD), 1))])),
  }
  _assert_invariant(fn, params, report.spec, x)


def test_unequal_split_of_a_fused_gqa_projection():
  n_rep = QH // KV
  params = _weights({"wqkv": (D, (QH + 2 * KV) * QHD), "wo": (QH * QHD, D)})
  x = np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)

  def fn(p, x):
    q, k, v = jnp.split(x @ p["wqkv"], [QH * QHD, (QH + KV) * QHD], axis=-1)
    q = q.reshape(B, T, QH, QHD)
    k, v = (_repeat_kv(z.reshape(B, T, KV, QHD), n_rep) for z in (k, v))
    return x + _causal_attention(q, k, v) @ p["wo"]

  spec = _traced(fn, params, x)
  _assert_invariant(fn, params, spec, x)
  qp, kp, vp = (0, QH * QHD), (QH * QHD, (QH + KV) * QHD), ((QH + KV) * QHD, (QH + 2 * KV) * QHD)
  kv_q, kv_kv = ((KV, n_rep * QHD), 0), ((KV, QHD), 0)
  assert (KV, frozenset([_ref("wqkv", axis=1, factor=kv_q, part=qp), _ref("wqkv", axis=1, factor=kv_kv, part=kp),
                         _ref("wqkv", axis=1, factor=kv_kv, part=vp), _ref("wo", axis=0, factor=kv_q)])) \
      in _as_sets(spec)
  assert (QHD, frozenset([_ref("wqkv", axis=1, factor=((QH, QHD), 1), part=qp),
                          _ref("wqkv", axis=1, factor=((KV, QHD), 1), part=kp)])) in _as_sets(spec)


# Flax linen: nn.Embed (lookup and tied attend), Dense c_attn split, learned positions.

class _FlaxGPT2(nn.Module):
  qkv: str = "split"  # the form of c_attn's q | k | v (`_as_qkv`)

  @nn.compact
  def __call__(self, ids):
    wte = nn.Embed(V, D, name="wte")
    h = wte(ids) + nn.Embed(L, D, name="wpe")(jnp.arange(ids.shape[1]))
    for i in range(2):
      y = nn.LayerNorm(name=f"ln1_{i}")(h)
      q, k, v = _as_qkv(nn.Dense(3 * D, name=f"c_attn_{i}")(y), self.qkv)
      h = h + nn.Dense(D, name=f"c_proj_{i}")(_causal_attention(q, k, v))
      y = nn.LayerNorm(name=f"ln2_{i}")(h)
      h = h + nn.Dense(D, name=f"proj_{i}")(nn.gelu(nn.Dense(F, name=f"fc_{i}")(y)))
    return wte.attend(nn.LayerNorm(name="ln_f")(h))


@pytest.fixture(scope="module")
def flax_gpt2():
  """(variables, ids, the spec of the split form)."""
  model, ids = _FlaxGPT2(), _ids()
  variables = _random_like(jax.eval_shape(model.init, jax.random.key(0), ids))
  return variables, ids, _traced(model.apply, variables, ids)


def test_gpt2_block_flax_linen(flax_gpt2):
  model = _FlaxGPT2()
  variables, ids, spec = flax_gpt2
  _assert_invariant(model.apply, variables, spec, ids)
  sets = _as_sets(spec)
  p = lambda *path: ("params", *path)
  (stream,) = [refs for n, refs in sets if _ref(*p("wte", "embedding"), axis=1) in refs]
  assert {_ref(*p("ln_f", "scale"), axis=0), _ref(*p("c_attn_1", "kernel"), axis=0),
          _ref(*p("proj_0", "kernel"), axis=1), _ref(*p("c_proj_1", "bias"), axis=0)} < stream
  assert all(_ref(*p("wpe", "embedding"), axis=a) not in refs for _, refs in sets for a in (0, 1)) or \
      _ref(*p("wpe", "embedding"), axis=1) in stream
  assert _ref(*p("wpe", "embedding"), axis=1) in stream
  heads, within = ((H, HD), 0), ((H, HD), 1)
  for i in range(2):
    c_attn = ("c_attn_" + str(i), "kernel")
    assert (H, frozenset([_ref(*p(*c_attn), axis=1, factor=heads, part=(s, s + D)) for s in (0, D, 2 * D)]
                         + [_ref(*p(f"c_attn_{i}", "bias"), axis=0, factor=heads, part=(s, s + D))
                            for s in (0, D, 2 * D)]
                         + [_ref(*p(f"c_proj_{i}", "kernel"), axis=0, factor=heads)])) in sets
    assert (HD, frozenset([_ref(*p(*c_attn), axis=1, factor=within, part=(2 * D, 3 * D)),
                           _ref(*p(f"c_attn_{i}", "bias"), axis=0, factor=within, part=(2 * D, 3 * D)),
                           _ref(*p(f"c_proj_{i}", "kernel"), axis=0, factor=within)])) in sets
  assert len(spec.groups) == 1 + 2 * 4


@pytest.mark.parametrize("form", ["index", "moveaxis"])
def test_gpt2_fused_qkv_reshaped_flax_linen(form, flax_gpt2):
  variables, ids, split_spec = flax_gpt2
  model = _FlaxGPT2(qkv=form)
  spec = _traced(model.apply, variables, ids)
  assert spec == split_spec
  assert len(spec.groups) == 1 + 2 * 4
  _assert_invariant(model.apply, variables, spec, ids, seed=1)


class _FlaxMHA(nn.Module):
  """nn.MultiHeadDotProductAttention, RMSNorm, a fused SwiGLU split in two, tied nn.Embed."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(V, D, name="embed")
    h = embed(ids)
    y = nn.RMSNorm(name="rms1")(h)
    h = h + nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * HD, name="attn")(
        y, mask=nn.make_causal_mask(ids))
    gate, up = jnp.split(nn.Dense(2 * F, name="gate_up")(nn.RMSNorm(name="rms2")(h)), 2, axis=-1)
    h = h + nn.Dense(D, name="down")(nn.silu(gate) * up)
    return embed.attend(nn.RMSNorm(name="norm")(h))


def test_mha_swiglu_rmsnorm_flax_linen():
  model, ids = _FlaxMHA(), _ids()
  variables = _random_like(jax.eval_shape(model.init, jax.random.key(0), ids))
  spec = _traced(model.apply, variables, ids)
  _assert_invariant(model.apply, variables, spec, ids)
  sets = _as_sets(spec)
  p = lambda *path: ("params", *path)
  (stream,) = [refs for _, refs in sets if _ref(*p("embed", "embedding"), axis=1) in refs]
  assert {_ref(*p("rms1", "scale"), axis=0), _ref(*p("attn", "query", "kernel"), axis=0),
          _ref(*p("attn", "out", "kernel"), axis=2), _ref(*p("gate_up", "kernel"), axis=0),
          _ref(*p("down", "kernel"), axis=1), _ref(*p("norm", "scale"), axis=0)} < stream
  assert (H, frozenset([_ref(*p("attn", n, "kernel"), axis=1) for n in ("query", "key", "value")]
                       + [_ref(*p("attn", n, "bias"), axis=0) for n in ("query", "key", "value")]
                       + [_ref(*p("attn", "out", "kernel"), axis=0)])) in sets
  # Gate and up multiply unit by unit: their halves of the fused kernel join.
  assert (F, frozenset([_ref(*p("gate_up", "kernel"), axis=1, part=(0, F)),
                        _ref(*p("gate_up", "kernel"), axis=1, part=(F, 2 * F)),
                        _ref(*p("gate_up", "bias"), axis=0, part=(0, F)),
                        _ref(*p("gate_up", "bias"), axis=0, part=(F, 2 * F)),
                        _ref(*p("down", "kernel"), axis=0)])) in sets


class _NnxNet(nnx.Module):
  """nnx.Embed (lookup and tied attend), a fused nnx.Linear q | k | v in `form` (`_as_qkv`)."""

  def __init__(self, rngs, form="split"):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.qkv = nnx.Linear(D, 3 * D, rngs=rngs)
    self.out = nnx.Linear(D, D, rngs=rngs)
    self.form = form

  def __call__(self, ids):
    h = self.embed(ids)
    h = h + self.out(_causal_attention(*_as_qkv(self.qkv(h), self.form)))
    return self.embed.attend(h)


def _nnx_apply(form):
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: _NnxNet(nnx.Rngs(0), form)))
  return lambda s, ids: nnx.merge(graphdef, s)(ids)


@pytest.fixture(scope="module")
def nnx_net():
  """(state, ids, the spec of the split form)."""
  _, shapes = nnx.split(nnx.eval_shape(lambda: _NnxNet(nnx.Rngs(0))))
  state, ids = _random_like(shapes), _ids()
  return state, ids, _traced(_nnx_apply("split"), state, ids)


def test_embedding_and_fused_split_flax_nnx(nnx_net):
  state, ids, spec = nnx_net
  _assert_invariant(_nnx_apply("split"), state, spec, ids)
  (stream,) = [refs for refs in spec.groups.values() if _ref("embed", "embedding", "value", axis=1) in refs]
  assert {_ref("qkv", "kernel", "value", axis=0), _ref("out", "kernel", "value", axis=1),
          _ref("out", "bias", "value", axis=0)} <= set(stream)
  heads, within, v = ((H, HD), 0), ((H, HD), 1), (2 * D, 3 * D)
  assert (H, frozenset([_ref("qkv", n, "value", axis=a, factor=heads, part=(s, s + D))
                        for n, a in (("kernel", 1), ("bias", 0)) for s in (0, D, 2 * D)]
                       + [_ref("out", "kernel", "value", axis=0, factor=heads)])) in _as_sets(spec)
  assert (HD, frozenset([_ref("qkv", n, "value", axis=a, factor=within, part=v)
                         for n, a in (("kernel", 1), ("bias", 0))]
                        + [_ref("out", "kernel", "value", axis=0, factor=within)])) in _as_sets(spec)
  assert len(spec.groups) == 4  # stream, heads, q/k head_dim, v/o head_dim


@pytest.mark.parametrize("form", ["index", "unstack"])
def test_fused_qkv_reshaped_flax_nnx(form, nnx_net):
  state, ids, split_spec = nnx_net
  fn = _nnx_apply(form)
  spec = _traced(fn, state, ids)
  assert spec == split_spec
  assert len(spec.groups) == 4
  _assert_invariant(fn, state, spec, ids, seed=1)


# Unread variables, control flow and the one warning.

def test_unread_variables_are_in_no_group_and_reported():
  params = _weights({"w1": (4, 6), "w2": (6, 2), "unused": (6, 3)})
  x = np.ones((3, 4), np.float32)
  fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
  report = trace.spec_report(fn, params, x)
  assert report.unread == (("unused",),)
  assert _as_sets(report.spec) == {(6, frozenset([_ref("w1", axis=1), _ref("w2", axis=0)]))}
  with pytest.warns(UserWarning, match=r"never read, in no group: unused\.") as record:
    trace.permutation_spec(fn, params, x)
  assert len(record) == 1


def test_cond_and_custom_vjp_are_interpreted():
  @jax.custom_vjp
  def clip_grad_tanh(x):
    return jnp.tanh(x)

  clip_grad_tanh.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (jnp.clip(g, -1, 1),))
  params = _weights({"w1": (4, 6), "w2": (6, 2)})
  x = np.ones((3, 4), np.float32)

  def fn(p, x):
    h = jax.lax.cond(x.sum() > 0, lambda h: clip_grad_tanh(h), lambda h: h * 2, x @ p["w1"])
    return h @ p["w2"]

  spec = _traced(fn, params, x)
  assert _as_sets(spec) == {(6, frozenset([_ref("w1", axis=1), _ref("w2", axis=0)]))}
  _assert_invariant(fn, params, spec, x)


def test_one_warning_names_each_fixing_construct_and_its_variables():
  params = _weights({"embed": (4, 6), "layers": (3, 6, 6), "w": (6, 5), "sorted": (5, 5), "picked": (5, 5),
                     "out": (5, 2)})

  def fn(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x @ p["embed"], p["layers"])
    h = jax.lax.while_loop(lambda c: c[1] < 2, lambda c: (c[0] * 0.5, c[1] + 1), (h @ p["w"], 0))[0]
    h = jnp.sort(jnp.tanh(h @ p["sorted"]), -1)
    h = jnp.tanh(h @ p["picked"])[:, jnp.array([0, 2, 1, 4, 3])]
    return h @ p["out"]

  with pytest.warns(UserWarning) as record:
    report_spec = trace.permutation_spec(fn, params, np.ones((3, 4), np.float32))
  assert len(record) == 1
  message = str(record[0].message)
  for part in ("gather fixed axes of out, picked", "sort fixed axes of picked, sorted",
               "while fixed axes of sorted, w", "DESIGN.md"):
    assert part in message
  assert "scan" not in message  # interpreted: its carry joins every layer (tests/test_stacked.py)
  report = trace.spec_report(fn, params, np.ones((3, 4), np.float32))
  assert report.spec == report_spec
  assert set(report.fixed_by) == {"gather", "sort", "while"}
  assert _as_sets(report_spec) == {(6, frozenset([_ref("embed", axis=1), _ref("layers", axis=1),
                                                  _ref("layers", axis=2), _ref("w", axis=0)]))}


# AxisRef.part: checks, JSON, permutation, and the readers that refuse it.

def test_axis_ref_parts_check_round_trip_and_permute():
  from mergejax import spec as spec_lib
  from mergejax.merge import combine
  w = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)
  spec = spec_lib.PermutationSpec(
      {"heads": [_ref("w", axis=1, factor=((3, 2, 2), 1))],
       "qk": [_ref("w", axis=1, factor=((2, 2), 1), part=(0, 4)), _ref("w", axis=1, factor=((2, 2), 1), part=(4, 8))],
       "v": [_ref("w", axis=1, factor=((2, 2), 1), part=(8, 12))]},
      {"heads": 2, "qk": 2, "v": 2})
  spec_lib.check_spec(spec, {"w": w})
  assert spec_lib.PermutationSpec.from_json(spec.to_json()) == spec
  perm = {"heads": np.array([1, 0]), "qk": np.array([0, 1]), "v": np.array([1, 0])}
  got = permute.apply_permutation(spec, perm, {"w": w})["w"]
  want = w.reshape(2, 3, 2, 2)[:, :, ::-1].copy()
  want[:, 2] = want[:, 2, :, ::-1]
  np.testing.assert_array_equal(got, want.reshape(2, 12))
  np.testing.assert_array_equal(permute.apply_permutation(spec, perm, {"w": jnp.asarray(w)})["w"], got)
  bad = [
      ({"a": [_ref("w", axis=1, part=(0, 6))], "b": [_ref("w", axis=1, part=(4, 8))]}, {"a": 6, "b": 4},
       "overlapping parts"),
      ({"a": [_ref("w", axis=1, factor=((2, 6), 0))], "b": [_ref("w", axis=1, part=(4, 8))]}, {"a": 2, "b": 4},
       "cut the blocks"),
      ({"a": [_ref("w", axis=1, part=(8, 14))]}, {"a": 6}, "part out of range"),
  ]
  for groups, sizes, match in bad:
    with pytest.raises(ValueError, match=match):
      spec_lib.check_spec(spec_lib.PermutationSpec(groups, sizes), {"w": w})
  with pytest.raises(NotImplementedError, match="part of axis 1"):
    combine.leaf_view(w.shape, [("qk", spec.groups["qk"][0])])
