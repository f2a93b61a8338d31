"""The zoo MoE block, routing statistics, M-SMoE and MC-SMoE's low-rank + sparse compression.

Oracles: a NumPy forward pass of the MoE classifier; the hand spec for the
traced one (one hidden permutation per expert, a batched group) and the
function's invariance under it; NumPy loops for the routing statistics, the
grouping and the frequency-weighted merge; a model with duplicated (and
permuted) experts, which must merge to fewer experts with the same function;
Eckart-Young for the low-rank part.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import permute
from mergejax import routing
from mergejax import stacked
from mergejax.merge import moe as merge_moe
from mergejax.models import moe

CFG = dict(features=(6,), num_experts=4, expert_features=5, top_k=2, num_classes=3)
E, H, D = 4, 5, 6


def _as_sets(spec):
  return {(spec.sizes[g], spec.batch_sizes.get(g), frozenset(refs)) for g, refs in spec.groups.items()}


@pytest.fixture(scope="module")
def setup():
  model = mj.models.build("moe_mlp", **CFG)
  x = np.random.default_rng(0).standard_normal((24, 2, 4)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x[:2])
  rng = np.random.default_rng(1)  # every leaf random, biases too (no init: its eager ops compile slowly)
  variables = jax.tree.map(lambda s: (0.6 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  return model, jax.jit(model.apply), variables, x


def _numpy_forward(variables, x, top_k):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  h = np.maximum(x.reshape(len(x), -1) @ p["hidden_0"]["kernel"] + p["hidden_0"]["bias"], 0)
  blk = p["moe"]
  logits = h @ blk["router"]["kernel"] + blk["router"]["bias"]
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  out = np.zeros_like(h)
  for r in range(len(h)):
    for e in np.argsort(-logits[r], kind="stable")[:top_k]:
      hidden = np.maximum(h[r] @ blk["w_in"][e] + blk["b_in"][e], 0)
      out[r] += probs[r, e] * (hidden @ blk["w_out"][e] + blk["b_out"][e])
  return (h + out) @ p["head"]["kernel"] + p["head"]["bias"]


# The block in the zoo.


def test_moe_mlp_computes_the_numpy_mixture(setup):
  _, apply, variables, x = setup
  np.testing.assert_allclose(apply(variables, x), _numpy_forward(variables, x, 2), rtol=1e-4, atol=1e-4)


def test_traced_spec_has_one_hidden_permutation_per_expert(setup):
  model, apply, variables, x = setup
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    traced = mj.permutation_spec(model.apply, variables, x[:3])
  hand = mj.models.permutation_spec("moe_mlp", variables, **CFG)
  assert _as_sets(traced) == _as_sets(hand)
  assert hand.batch_sizes == {"experts": E}
  perm = permute.random_permutation(hand, jax.random.key(3))
  assert perm["experts"].shape == (E, H) and len({tuple(r) for r in np.asarray(perm["experts"])}) > 1
  permuted = permute.apply_permutation(hand, perm, variables)
  np.testing.assert_allclose(apply(permuted, x), apply(variables, x), rtol=1e-5, atol=1e-5)
  # One expert's rows of w_in alone permuted: the function changes (the group is not vacuous).
  broken = jax.tree.map(np.array, variables)
  broken["params"]["moe"]["w_in"][1] = broken["params"]["moe"]["w_in"][1][:, np.roll(np.arange(H), 1)]
  assert not np.allclose(apply(broken, x), apply(variables, x), atol=1e-4)
  flat_spec, _ = stacked.unstack(hand, variables)
  assert [g for g in flat_spec.groups if g.startswith("experts")] == [f"experts[{e}]" for e in range(E)]


def test_the_block_on_token_sequences_has_a_batched_group_and_counts_every_token():
  block = moe.MoE(num_experts=3, features=4, top_k=1)
  x = np.random.default_rng(2).standard_normal((2, 5, D)).astype(np.float32)  # [batch, tokens, d]
  rng = np.random.default_rng(3)
  shapes = jax.eval_shape(block.init, jax.random.key(0), x)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  spec = mj.permutation_spec(block.apply, variables, x, warn=False)
  assert spec.batch_sizes == {"params/b_in:1": 3} and spec.sizes["params/b_in:1"] == 4

  def fn(v, a):
    _, state = block.apply(v, a, mutable=["intermediates"])
    return state["intermediates"]["router_logits"][0], state["intermediates"]["expert_hidden"][0]

  r = mj.stats.accumulate(routing.routing_statistics(fn, top_k=1), variables, [x], progress=False)
  assert float(r.count) == 10 and math.isclose(float(r.frequency.sum()), 1.0, rel_tol=1e-6)


def test_layout_and_config_errors():
  sizes = mj.models.groups("moe_mlp", **CFG)
  assert sizes == {"hidden_0": D, "experts": H}
  wide = mj.models.build("moe_mlp", mj.MergeLayout.from_ratios(sizes, 0.6), **CFG)
  assert wide.expert_features == 3 + 2 + 2 and wide.features == (4 + 2 + 2,)
  with pytest.raises(ValueError, match="top_k 5 exceeds num_experts 4"):
    mj.models.config("moe_mlp", **{**CFG, "top_k": 5})
  with pytest.raises(ValueError, match="features needs at least one layer"):
    mj.models.config("moe_mlp", features=())
  with pytest.raises(ValueError, match="num_experts must be a positive int"):
    mj.models.config("moe_mlp", num_experts=0)
  with pytest.raises(ValueError, match=r"MoE: top_k must be in \[1, num_experts=2\], got 3"):
    jax.eval_shape(moe.MoE(num_experts=2, features=3, top_k=3).init, jax.random.key(0), np.zeros((1, 4)))


# The LM's moe option: every block's MLP an MoE block.

LM_MOE = dict(embed_dim=8, depth=2, num_heads=4, head_dim=4, max_len=8, mlp_dim=5, moe=dict(num_experts=3, top_k=2))


def _random_variables(model, x, seed, scale=0.3):
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def lm_ids():
  return np.random.default_rng(11).integers(0, 256, (3, 6)).astype(np.int32)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_lm_moe_specs_give_one_permutation_per_expert_per_layer_and_keep_the_logits(style, lm_ids):
  cfg = dict(LM_MOE, style=style)
  model = mj.models.build("lm", **cfg)
  variables = _random_variables(model, lm_ids, 12)
  blk = variables["params"]["block1"]
  assert "mlp_up" not in blk and blk["moe"]["w_in"].shape == (3, 8, 5) and blk["moe"]["w_out"].shape == (3, 5, 8)
  hand = mj.models.permutation_spec("lm", variables, **cfg)
  assert hand.batch_sizes == {"block0.experts": 3, "block1.experts": 3}
  assert hand.names == tuple(mj.models.groups("lm", **cfg))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    traced = mj.permutation_spec(model.apply, variables, lm_ids)
  assert _as_sets(traced) == _as_sets(hand)
  router_biases = {("params", f"block{i}", "moe", "router", "bias") for i in range(2)}  # the expert axis is fixed
  assert {r.path for refs in hand.groups.values() for r in refs} == set(mj.tree.leaves_by_path(variables)) - router_biases
  apply = jax.jit(model.apply)
  out = apply(variables, lm_ids)
  for spec, seed in ((hand, 0), (traced, 1)):
    perm = permute.random_permutation(spec, jax.random.key(seed))
    np.testing.assert_allclose(apply(permute.apply_permutation(spec, perm, variables), lm_ids), out,
                               rtol=1e-4, atol=1e-4)
  # One expert of one layer permuted alone changes the logits: the groups are not vacuous.
  broken = jax.tree.map(np.array, variables)
  broken["params"]["block1"]["moe"]["w_in"][2] = broken["params"]["block1"]["moe"]["w_in"][2][:, [1, 2, 3, 4, 0]]
  assert not np.allclose(apply(broken, lm_ids), out, atol=1e-4)


def test_lm_moe_routes_every_token_and_merges_duplicated_experts_per_layer(lm_ids):
  """Each layer's experts duplicated (permuted copies, k = E): M-SMoE per layer merges back to the same logits."""
  dense = dict(LM_MOE, style="llama", moe=dict(num_experts=4, top_k=4))
  model = mj.models.build("lm", **dense)
  variables = _random_variables(model, lm_ids, 13)
  params = dict(variables["params"])
  assert moe.block_paths(params) == ["block0/moe", "block1/moe"]
  rng = np.random.default_rng(14)
  blocks = {}
  for path in moe.block_paths(params):
    blk = jax.tree.map(np.array, params[path.split("/")[0]]["moe"])
    for src, dst in ((0, 2), (1, 3)):
      p = rng.permutation(5)
      blk["w_in"][dst], blk["b_in"][dst] = blk["w_in"][src][:, p], blk["b_in"][src][p]
      blk["w_out"][dst], blk["b_out"][dst] = blk["w_out"][src][p], blk["b_out"][src]
      blk["router"]["kernel"][:, dst], blk["router"]["bias"][dst] = blk["router"]["kernel"][:, src], blk[
          "router"]["bias"][src]
    blocks[path] = blk
  v = {"params": moe.replace_blocks(params, blocks)}
  out, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(v, lm_ids)
  small = jax.jit(mj.models.build("lm", **dict(dense, moe=dict(num_experts=2, top_k=2))).apply)
  merged = {}
  split = lambda _, rows: (rows[..., :4], rows[..., 4:].reshape(*rows.shape[:-1], 4, 5))  # noqa: E731
  stat = routing.routing_statistics(split, top_k=2, activations=True)  # one compilation for both layers
  for path in moe.block_paths(v["params"]):
    sown = state["intermediates"][path.split("/")[0]]["moe"]  # what routing_fn(model, path) returns
    logits, hidden = sown["router_logits"][0], sown["expert_hidden"][0]  # f32[b, t, 4], f32[b, t, 4, 5]
    r = mj.stats.accumulate(stat, None, [jnp.concatenate([logits, hidden.reshape(3, 6, 20)], -1)], progress=False)
    assert float(r.count) == lm_ids.size  # every token a row
    r = r._replace(frequency=jnp.array([0.4, 0.3, 0.2, 0.1]))  # a duplicate ties its original: split the pairs
    merged[path], groups = merge_moe.msmoe(blocks[path], r, 2, matching="activation")
    np.testing.assert_array_equal(groups.labels, [0, 1, 0, 1])
  np.testing.assert_allclose(small({"params": moe.replace_blocks(v["params"], merged)}, lm_ids), out,
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(KeyError, match=r"\['block2/moe'\] are not MoE blocks"):
    moe.replace_blocks(params, {"block2/moe": merged["block0/moe"]})


def test_lm_moe_follows_a_layout_and_refuses_bad_options(lm_ids):
  cfg = dict(LM_MOE, style="gpt2")
  sizes = mj.models.groups("lm", **cfg)
  layout = mj.MergeLayout.from_ratios(sizes, {g: 0.6 if g.endswith("experts") else 1.0 for g in sizes})
  shapes = jax.eval_shape(mj.models.build("lm", layout, **cfg).init, jax.random.key(0), lm_ids)["params"]
  widths = layout.widths()
  assert widths["block0.experts"] == 7  # 5 units at ratio 0.6: 3 shared + 2 + 2
  assert shapes["block0"]["moe"]["w_in"].shape == (3, widths["embed"], widths["block0.experts"])
  for bad, message in ((dict(num_experts=2), "moe must be None or dict"), (dict(num_experts=2, top_k=3),
                       "moe.top_k 3 exceeds moe.num_experts 2"), (dict(num_experts=0, top_k=1),
                       "moe.num_experts must be a positive int")):
    with pytest.raises(ValueError, match=message):
      mj.models.config("lm", **dict(cfg, moe=bad))
  with pytest.raises(ValueError, match="moe with scan=True is not supported"):
    mj.models.config("lm", **dict(cfg, scan=True))


# Routing statistics.


def _numpy_routing(logits, hidden, k):
  logits, hidden = np.asarray(logits, np.float64), np.asarray(hidden, np.float64)
  n, e = logits.shape
  top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  freq = np.zeros(e)
  for row in top:
    freq[row] += 1
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  sim = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in logits.T] for a in logits.T])
  flat = hidden.reshape(n, -1)
  cov = np.cov(flat, rowvar=False, bias=True).reshape(e, -1, e, hidden.shape[-1])
  return freq / n, logits.mean(0), probs.mean(0), sim, flat.mean(0).reshape(e, -1), cov


def test_routing_statistics_equal_numpy_and_do_not_depend_on_batching(setup):
  model, _, variables, x = setup
  fn = moe.routing_fn(model)
  logits, hidden = jax.jit(fn)(variables, x)
  assert logits.shape == (len(x), E) and hidden.shape == (len(x), E, H)
  want = _numpy_routing(logits, hidden, 2)
  stat = routing.routing_statistics(fn, top_k=2, activations=True)
  one = mj.stats.accumulate(stat, variables, [x[:12], x[12:]], progress=False)
  ragged = mj.stats.accumulate(stat, variables, [x[:12], x[12:17], x[17:]], progress=False)  # one compilation
  for r in (one, ragged):
    assert float(r.count) == len(x)
    got = (r.frequency, r.mean_logits, r.mean_probs, r.logit_similarity, r.hidden_mean, r.hidden_cov)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)
  assert math.isclose(float(one.frequency.sum()), 2.0, rel_tol=1e-6)
  corr = routing.expert_correlation(one)
  a, b = np.asarray(hidden[:, 1], np.float64), np.asarray(hidden[:, 2], np.float64)
  cross = (a - a.mean(0)).T @ (b - b.mean(0)) / len(a)
  np.testing.assert_allclose(corr[1, 2], cross / np.outer(np.sqrt(a.var(0) + 1e-12), np.sqrt(b.var(0) + 1e-12)),
                             rtol=1e-3, atol=1e-4)


def test_routing_statistics_of_logits_alone_and_errors(setup):
  model, _, variables, x = setup
  fn = moe.routing_fn(model)
  logits_only = mj.stats.accumulate(routing.routing_statistics(lambda v, a: fn(v, a)[0], top_k=1), variables,
                                    [x], progress=False)
  assert logits_only.hidden_cov is None and logits_only.hidden_mean is None
  logits, hidden = jax.jit(fn)(variables, x)
  np.testing.assert_allclose(logits_only.frequency, _numpy_routing(logits, hidden, 1)[0], atol=1e-6)
  with pytest.raises(ValueError, match="hold no hidden activations"):
    routing.expert_correlation(logits_only)
  with pytest.raises(ValueError, match="top_k must be a positive int"):
    routing.routing_statistics(fn, top_k=0)
  with pytest.raises(ValueError, match="top_k 5 exceeds the 4 experts"):
    mj.stats.accumulate(routing.routing_statistics(fn, top_k=5), variables, [x], progress=False)
  with pytest.raises(ValueError, match=r"activations=True needs routing_fn to return \(logits, hidden\)"):
    mj.stats.accumulate(routing.routing_statistics(lambda v, a: fn(v, a)[0], top_k=1, activations=True),
                        variables, [x], progress=False)
  with pytest.raises(ValueError, match="hidden activations must be f32"):
    mj.stats.accumulate(routing.routing_statistics(lambda v, a: (fn(v, a)[0], fn(v, a)[1][:, :2]), top_k=1,
                                                   activations=True), variables, [x], progress=False)


# Grouping and merging against NumPy.


def _numpy_groups(freq, sim, g):
  order = sorted(range(len(freq)), key=lambda e: (-freq[e], e))
  dominants = order[:g]
  labels = []
  for e in range(len(freq)):
    if e in dominants:
      labels.append(dominants.index(e))
    else:
      best = 0
      for j in range(1, g):
        if sim[e][dominants[j]] > sim[e][dominants[best]]:
          best = j
      labels.append(best)
  return labels, dominants


def test_group_experts_equals_numpy():
  rng = np.random.default_rng(4)
  for trial in range(6):
    e = 8
    freq = rng.integers(0, 4, e) / 4.0  # ties in frequency
    sim = rng.uniform(-1, 1, (e, e))
    for g in (1, 3, 8):
      got = merge_moe.group_experts(freq, sim, g)
      labels, dominants = _numpy_groups(freq, sim, g)
      np.testing.assert_array_equal(got.labels, labels)
      np.testing.assert_array_equal(got.dominants, dominants)


def _random_block(seed, e=E, d=D, h=H):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  return {"router": {"kernel": f(d, e), "bias": f(e)}, "w_in": f(e, d, h), "b_in": f(e, h),
          "w_out": f(e, h, d), "b_out": f(e, d)}


def test_frequency_weighted_merge_equals_numpy():
  block = _random_block(5)
  groups = merge_moe.ExpertGroups(np.array([1, 0, 1, 1], np.int32), np.array([1, 0], np.int32))
  freq = np.array([0.5, 0.25, 0.0, 0.75])
  merged = merge_moe.merge_expert_groups(block, groups, freq)
  for g, members in ((0, [1]), (1, [0, 2, 3])):
    w = freq[members] / freq[members].sum()
    for k in ("w_in", "b_in", "w_out", "b_out"):
      np.testing.assert_allclose(merged[k][g], np.tensordot(w, block[k][members], axes=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["router"]["kernel"][:, g], block["router"]["kernel"][:, members] @ w,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["router"]["bias"][g],
                               block["router"]["bias"][members] @ w + np.log(len(members)), rtol=1e-5)
  never = merge_moe.merge_expert_groups(block, groups, np.array([0.5, 0.25, 0.0, 0.0]))  # group 1 has mass 0.5
  np.testing.assert_allclose(never["w_in"][1], block["w_in"][0], rtol=1e-6)
  unused = merge_moe.merge_expert_groups(block, groups, np.array([0.0, 0.25, 0.0, 0.0]))  # group 1 never routed
  np.testing.assert_allclose(unused["w_in"][1], block["w_in"][[0, 2, 3]].mean(0), rtol=1e-5, atol=1e-6)
  # Identity: E groups of one expert each (M-SMoE at num_groups = E) is the block, experts by frequency.
  alone = merge_moe.group_experts(freq, np.eye(E), E)
  np.testing.assert_array_equal(alone.dominants, [3, 0, 1, 2])
  same = merge_moe.merge_expert_groups(block, alone, freq)
  for k in ("w_in", "b_in", "w_out", "b_out"):
    np.testing.assert_allclose(same[k], block[k][alone.dominants], rtol=1e-6)
  np.testing.assert_allclose(same["router"]["kernel"], block["router"]["kernel"][:, alone.dominants], rtol=1e-6)
  np.testing.assert_allclose(same["router"]["bias"], block["router"]["bias"][alone.dominants], rtol=1e-6)


def _duplicated(variables, rng):
  """Experts 2, 3 := expert 0 with its hidden units permuted (two ways); router columns copied.

  Groups of unequal sizes ({0, 2, 3} and {1}), so the router's log(group size) matters.
  """
  v = jax.tree.map(np.array, variables)
  blk = v["params"]["moe"]
  perms = [rng.permutation(H) for _ in range(2)]
  for p, src, dst in ((perms[0], 0, 2), (perms[1], 0, 3)):
    blk["w_in"][dst], blk["b_in"][dst] = blk["w_in"][src][:, p], blk["b_in"][src][p]
    blk["w_out"][dst], blk["b_out"][dst] = blk["w_out"][src][p], blk["b_out"][src]
    blk["router"]["kernel"][:, dst], blk["router"]["bias"][dst] = blk["router"]["kernel"][:, src], blk["router"][
        "bias"][src]
  return v, perms


@pytest.fixture(scope="module")
def duplicated(setup):
  """The block with duplicated experts, under dense gating (k = E: the log-sum-exp router is exact)."""
  _, _, variables, x = setup
  dense = {**CFG, "top_k": E}
  model = mj.models.build("moe_mlp", **dense)
  v, _ = _duplicated(variables, np.random.default_rng(6))
  stat = routing.routing_statistics(moe.routing_fn(model), top_k=2, activations=True)
  r = mj.stats.accumulate(stat, v, [x], progress=False)
  small = mj.models.build("moe_mlp", **{**dense, "num_experts": 2, "top_k": 2})
  return v, r, jax.jit(model.apply)(v, x), jax.jit(small.apply)


@pytest.mark.parametrize("matching", ["weight", "activation"])
def test_duplicated_experts_merge_to_fewer_with_the_same_function(setup, duplicated, matching):
  x = setup[3]
  v, r, out, small_apply = duplicated
  np.testing.assert_allclose(r.logit_similarity[0, 2], 1.0, atol=1e-5)
  # A duplicate ties with its original on every row; frequencies that split each pair (the
  # data's top-2 would pick both of a pair, and then both would lead):
  r = r._replace(frequency=jnp.array([0.4, 0.3, 0.2, 0.1]))
  merged_block, groups = merge_moe.msmoe(v["params"]["moe"], r, 2, matching=matching)
  np.testing.assert_array_equal(groups.dominants, [0, 1])
  np.testing.assert_array_equal(groups.labels, [0, 1, 0, 0])
  np.testing.assert_allclose(small_apply({"params": {**v["params"], "moe": merged_block}}, x), out,
                             rtol=1e-4, atol=1e-4)
  unaligned, _ = merge_moe.msmoe(v["params"]["moe"], r, 2, matching="none")
  assert not np.allclose(small_apply({"params": {**v["params"], "moe": unaligned}}, x), out, atol=1e-3)


def test_align_experts_recovers_each_experts_permutation(setup):
  variables = setup[2]
  v, perms = _duplicated(variables, np.random.default_rng(7))
  groups = merge_moe.ExpertGroups(np.array([0, 1, 0, 0], np.int32), np.array([0, 1], np.int32))
  aligned, perm = merge_moe.align_experts(v["params"]["moe"], groups)
  np.testing.assert_array_equal(perm[:2], np.tile(np.arange(H), (2, 1)))
  np.testing.assert_array_equal(perm[2], np.argsort(perms[0]))
  np.testing.assert_array_equal(perm[3], np.argsort(perms[1]))
  for k in ("w_in", "b_in", "w_out", "b_out"):
    np.testing.assert_allclose(aligned[k][2:], aligned[k][[0, 0]], rtol=1e-6)


def test_select_experts_in_any_order_is_the_same_function(setup):
  _, apply, variables, x = setup
  blk = variables["params"]["moe"]
  shuffled = merge_moe.select_experts(blk, [2, 0, 3, 1])
  out = apply({"params": {**variables["params"], "moe": shuffled}}, x)
  np.testing.assert_allclose(out, apply(variables, x), rtol=1e-5, atol=1e-5)
  dropped = merge_moe.select_experts(blk, [3, 1])
  np.testing.assert_array_equal(dropped["w_in"], blk["w_in"][[3, 1]])
  np.testing.assert_array_equal(dropped["router"]["kernel"], blk["router"]["kernel"][:, [3, 1]])


# Low rank + sparse.


def test_low_rank_sparse_error_falls_with_rank_and_matches_eckart_young():
  w = np.random.default_rng(8).standard_normal((3, 7, 5)).astype(np.float32)
  sv = np.linalg.svd(w.astype(np.float64), compute_uv=False)
  errors = []
  for r in (0, 2, 5):
    parts = merge_moe.low_rank_sparse(w, r)
    assert parts.u.shape == (3, 7, r) and parts.v.shape == (3, r, 5)
    err = np.linalg.norm(np.asarray(parts.u) @ np.asarray(parts.v) + np.asarray(parts.sparse) - w, axis=(1, 2))
    np.testing.assert_allclose(err, np.sqrt((sv[:, r:] ** 2).sum(1)), rtol=1e-4, atol=1e-5)
    errors.append(err.sum())
  assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-4
  parts = merge_moe.low_rank_sparse(w, 1, density=0.2)
  residual = w - np.asarray(parts.u) @ np.asarray(parts.v)
  keep = round(0.2 * 35)
  for i in range(3):
    nonzero = np.flatnonzero(np.asarray(parts.sparse[i]))
    assert len(nonzero) == keep
    np.testing.assert_array_equal(np.sort(nonzero), np.sort(np.argsort(-np.abs(residual[i]).ravel())[:keep]))
  assert np.linalg.norm(np.asarray(parts.dense()) - w) < np.sqrt((sv[:, 1:] ** 2).sum())
  block = _random_block(9)
  compressed, sizes = merge_moe.compress_experts(block, 2, 0.1)
  assert sizes == {"dense": 2 * E * D * H, "compressed": 2 * E * (2 * (D + H) + round(0.1 * D * H))}
  assert compressed["w_in"].shape == block["w_in"].shape and compressed["b_in"] is block["b_in"]


# Bad inputs.


def test_errors_name_what_is_wrong():
  block = _random_block(10)
  with pytest.raises(ValueError, match=r"msmoe: the MoE block lacks \['w_out'\]"):
    merge_moe.msmoe({k: v for k, v in block.items() if k != "w_out"}, None, 2)
  with pytest.raises(ValueError, match=r"b_in has shape \(4, 3\), expected \(4, 5\)"):
    merge_moe.merge_expert_groups({**block, "b_in": np.zeros((4, 3))}, None)
  with pytest.raises(ValueError, match="w_in.*NaN|NaN.*w_in"):
    merge_moe.merge_expert_groups({**block, "w_in": np.full((E, D, H), np.nan, np.float32)}, None)
  with pytest.raises(ValueError, match=r"num_groups must be an int in \[1, 4\]"):
    merge_moe.group_experts(np.ones(4), np.eye(4), 5)
  with pytest.raises(ValueError, match=r"similarity must be finite f32\[4, 4\]"):
    merge_moe.group_experts(np.ones(4), np.eye(3), 2)
  with pytest.raises(ValueError, match="frequency must be 4 finite non-negative"):
    merge_moe.group_experts(-np.ones(4), np.eye(4), 2)
  bad = merge_moe.ExpertGroups(np.array([0, 1, 0, 2], np.int32), np.array([0, 1], np.int32))
  with pytest.raises(ValueError, match="groups.labels must be 4 ints in"):
    merge_moe.merge_expert_groups(block, bad)
  swapped = merge_moe.ExpertGroups(np.array([0, 1, 0, 1], np.int32), np.array([1, 0], np.int32))
  with pytest.raises(ValueError, match="dominant g in group g"):
    merge_moe.align_experts(block, swapped)
  groups = merge_moe.ExpertGroups(np.array([0, 1, 0, 1], np.int32), np.array([0, 1], np.int32))
  with pytest.raises(ValueError, match="matching='activation' needs routing statistics"):
    merge_moe.align_experts(block, groups, matching="activation")
  with pytest.raises(ValueError, match="matching must be 'weight' or 'activation'"):
    merge_moe.align_experts(block, groups, matching="cosine")
  r = routing.RoutingStats(*[jnp.zeros(s) for s in ((), (3,), (3,), (3,), (3, 3))], None, None)
  with pytest.raises(ValueError, match="routing statistics are for 3 experts, the block has 4"):
    merge_moe.msmoe(block, r, 2)
  with pytest.raises(ValueError, match="keep must be distinct experts"):
    merge_moe.select_experts(block, [1, 1])
  with pytest.raises(ValueError, match=r"rank must be an int in \[0, 5\]"):
    merge_moe.low_rank_sparse(np.ones((5, 7)), 6)
  with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
    merge_moe.low_rank_sparse(np.ones((5, 7)), 1, density=1.5)
  with pytest.raises(ValueError, match=r"rank must be an int in \[0, 5\]"):
    merge_moe.compress_experts(block, 6)
