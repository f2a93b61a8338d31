"""A sparse mixture of MLP experts with a top-k router, and an MLP classifier around one.

    model = mj.models.build("moe_mlp", features=(64,), num_experts=8, expert_features=32, top_k=2)
    logits = model.apply(variables, x)               # x: f32[batch, ...] -> f32[batch, num_classes]
    routing = mj.models.moe.routing_fn(model)        # (variables, x) -> (router logits, expert hidden)
    mj.models.moe.block_paths(variables["params"])   # ["moe"]; ["block0/moe", ...] for the LM's moe option

`MoE` maps `x: f32[..., d]` to `sum_e gate_e(x) expert_e(x)`, where
`expert_e(x) = relu(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]` and the
gates are the router's softmax probabilities kept on the top-k experts of
each row (Switch Transformer's gating for k = 1, without renormalisation:
`top_k_gates`). Its parameters, the *block layout* that the expert merges of
`mergejax.merge.moe` read:

    router/kernel f32[d, E], router/bias f32[E]
    w_in f32[E, d, h], b_in f32[E, h], w_out f32[E, h, d_out], b_out f32[E, d_out]

The experts run under one `lax.scan` over the stacked copies (every expert on
every row, weighted by its gate, zero for the experts a row does not select),
so the tracer reads each expert's hidden units as a *batched group*: one
hidden permutation per expert (`AxisRef.batch = 0`, DESIGN.md). With the
collection `intermediates` mutable the block also sows its router logits
`f32[..., E]` and the experts' hidden activations `f32[..., E, h]` (outside
the scan, so the traced spec is unchanged), which `routing_fn` returns.

`moe_mlp` is `flatten -> Dense + ReLU (hidden_0, ...) -> h + MoE(h) -> head(s)`:
groups `hidden_i` (the last one is the stream the MoE reads and adds to) and
`experts` (each expert's hidden units, batched over `num_experts` copies).
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mergejax import spec as spec_lib
from mergejax.models import config
from mergejax.models import heads
from mergejax.models import layers


def top_k_gates(logits: jax.Array, k: int) -> jax.Array:
  """Softmax probabilities on each row's top-k experts, zero elsewhere.

  Args:
    logits: f32[..., E] router logits.
    k: experts per row, 1 <= k <= E (ties go to the lower index, as `lax.top_k`).

  Returns:
    f32[..., E]: `softmax(logits)` times the row's top-k mask (not renormalised).
  """
  probs = jax.nn.softmax(logits, axis=-1)
  _, index = jax.lax.top_k(logits, k)
  return probs * jax.nn.one_hot(index, logits.shape[-1], dtype=probs.dtype).sum(-2)


def expert_hidden(block: Mapping[str, Any], x: jax.Array) -> jax.Array:
  """Every expert's hidden activations: x f32[..., d] -> f32[..., E, h] (block layout above)."""
  return jax.nn.relu(jnp.einsum("...d,edh->...eh", x, block["w_in"]) + block["b_in"])


class MoE(nn.Module):
  """x: f32[..., d] -> f32[..., out_features or d], a top-k mixture of MLP experts.

  Attributes:
    num_experts: E.
    features: each expert's hidden width h.
    top_k: experts per row, 1 <= top_k <= num_experts.
    out_features: the output width; None: d.
  """

  num_experts: int
  features: int
  top_k: int
  out_features: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    e, h = self.num_experts, self.features
    if not 1 <= self.top_k <= e:
      raise ValueError(f"MoE: top_k must be in [1, num_experts={e}], got {self.top_k}")
    d = x.shape[-1]
    out = d if self.out_features is None else self.out_features
    logits = nn.Dense(e, name="router")(x)
    init = nn.initializers.lecun_normal(batch_axis=(0,))
    w_in = self.param("w_in", init, (e, d, h))
    b_in = self.param("b_in", nn.initializers.zeros, (e, h))
    w_out = self.param("w_out", init, (e, h, out))
    b_out = self.param("b_out", nn.initializers.zeros, (e, out))

    def expert(carry, params):
      w1, b1, w2, b2 = params
      return carry, jax.nn.relu(x @ w1 + b1) @ w2 + b2

    _, ys = jax.lax.scan(expert, None, (w_in, b_in, w_out, b_out))  # f32[E, ..., out]
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "router_logits", logits)
      self.sow("intermediates", "expert_hidden", expert_hidden({"w_in": w_in, "b_in": b_in}, x))
    return jnp.einsum("...e,e...o->...o", top_k_gates(logits, self.top_k), ys)


class MoEMLP(nn.Module):
  """x: f32[batch, ...] (flattened) -> logits: Dense + ReLU layers, then `h + MoE(h)`, then the head(s).

  Attributes:
    features: the trunk's widths, `hidden_0`, ...; the last is the stream the MoE reads.
    num_experts, expert_features, top_k: the `MoE` block (`moe`).
    num_classes: an int (head `head`) or a tuple (heads `head_0`, ...).
  """

  features: tuple[int, ...]
  num_experts: int
  expert_features: int
  top_k: int
  num_classes: heads.NumClasses

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    del train  # No layer behaves differently in training.
    x = layers.flatten_dense_relu(x, self.features, "hidden")
    x = x + MoE(self.num_experts, self.expert_features, self.top_k, name="moe")(x)
    return heads.task_heads(x, self.num_classes)


def routing_fn(model: nn.Module, block: str = "moe") -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  """`(variables, x) -> (router logits f32[..., E], expert hidden f32[..., E, h])` of one MoE block.

  Args:
    model: a module holding an `MoE` (e.g. `build("moe_mlp", ...)`).
    block: the MoE submodule's name in the `intermediates` tree, `/`-joined.

  The pair is what `mergejax.routing.routing_statistics` reads.
  """

  def fn(variables, x):
    _, state = model.apply(variables, x, mutable=["intermediates"])
    sown = state["intermediates"]
    for key in block.split("/"):
      sown = sown[key]
    return sown["router_logits"][0], sown["expert_hidden"][0]

  return fn


_BLOCK_LEAVES = frozenset({"router", "w_in", "b_in", "w_out", "b_out"})


def block_paths(params: Mapping[str, Any]) -> list[str]:
  """The `/`-joined paths of every `MoE` block in a params tree, in the tree's (sorted) order.

  A block is a mapping with the leaves `router`, `w_in`, `b_in`, `w_out`,
  `b_out` (the module docstring's layout); e.g. `["moe"]` for `moe_mlp`,
  `["block0/moe", "block1/moe"]` for `build("lm", moe=...)` of depth 2. Each
  path is also the block's `routing_fn(model, path)` (sown intermediates
  follow the params' module names).
  """
  out = []

  def walk(node, prefix):
    if _BLOCK_LEAVES <= set(node):
      out.append("/".join(prefix))
      return
    for key in sorted(node):
      if isinstance(node[key], Mapping):
        walk(node[key], (*prefix, key))

  walk(params, ())
  return out


def replace_blocks(params: Mapping[str, Any], blocks: Mapping[str, Any]) -> dict[str, Any]:
  """`params` with the block at each `/`-joined path of `blocks` replaced (`block_paths` names them).

  Raises:
    KeyError: naming a path of `blocks` that is not a block of `params`.
  """
  known = block_paths(params)
  unknown = sorted(set(blocks) - set(known))
  if unknown:
    raise KeyError(f"replace_blocks: {unknown} are not MoE blocks of the params (blocks: {known})")

  def put(node, keys, value):
    return value if not keys else {**node, keys[0]: put(node[keys[0]], keys[1:], value)}

  out = dict(params)
  for path, block in blocks.items():
    out = put(out, path.split("/"), block)
  return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEMLPConfig(config.ModelConfig):
  """`models.build("moe_mlp", features=(64,), num_experts=8, expert_features=32, top_k=2)`."""

  name = "moe_mlp"
  features: Sequence[int] = (64,)
  num_experts: int = 8
  expert_features: int = 32
  top_k: int = 2

  def __post_init__(self):
    super().__post_init__()
    self._set("features", config.positive_ints("features", self.features))
    if not self.features:
      raise ValueError("moe_mlp: features needs at least one layer (the MoE reads and adds to the last)")
    for field in ("num_experts", "expert_features", "top_k"):
      config.positive_int(field, getattr(self, field))
    if self.top_k > self.num_experts:
      raise ValueError(f"moe_mlp: top_k {self.top_k} exceeds num_experts {self.num_experts}")

  def groups(self) -> dict[str, int]:
    return {**{f"hidden_{i}": width for i, width in enumerate(self.features)}, "experts": self.expert_features}

  def module(self, widths: Mapping[str, int]) -> MoEMLP:
    return MoEMLP(features=tuple(widths[f"hidden_{i}"] for i in range(len(self.features))),
                  num_experts=self.num_experts, expert_features=widths["experts"], top_k=self.top_k,
                  num_classes=self.num_classes)

  def permutation_spec(self, variables) -> spec_lib.PermutationSpec:
    del variables  # The groups follow from the config alone.
    sizes = self.groups()
    b = config.SpecBuilder(sizes)
    names = [f"hidden_{i}" for i in range(len(self.features))]
    for i, g in enumerate(names):
      b.dense([g], names[i - 1] if i else None, g)
    stream, moe = names[-1], ("params", "moe")
    b.dense(["moe", "router"], stream, None)
    b.add(stream, (*moe, "w_in"), 1)
    b.add(stream, (*moe, "w_out"), 2)
    b.add(stream, (*moe, "b_out"), 1)
    for leaf, axis in (("w_in", 2), ("b_in", 1), ("w_out", 1)):
      b.add("experts", (*moe, leaf), axis)
    b.heads(self.num_classes, stream)
    refs = {g: [r._replace(batch=0) for r in rs] if g == "experts" else rs for g, rs in b.refs.items()}
    return spec_lib.PermutationSpec(refs, sizes, {"experts": self.num_experts})
