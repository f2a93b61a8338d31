r"""Expert merging in a sparse mixture of experts: M-SMoE and MC-SMoE against simple baselines.

    python -m experiments.moe --config=experiments/configs/moe_digits.py --workdir=/tmp/moe
    python -m experiments.moe --config=experiments/configs/moe_lm_text.py --workdir=/tmp/moe_lm

Per seed: trains a model with MoE blocks (a Switch load-balancing loss, the
mean over the blocks, keeps the experts in use) on the training data less a
validation slice: a `moe_mlp` classifier, or on a text corpus (`stdlib_text`)
the zoo LM with `moe=dict(num_experts, top_k)` (every block's MLP an MoE).
It gathers every block's routing statistics on training inputs (unlabelled,
`mj.routing.routing_statistics`; for the LM every token is a row, one pass
per block) and merges each block's E experts into each of `num_groups` by:

- M-SMoE: experts grouped around the most used ones by router-logit
  similarity, aligned to their dominant expert, merged by routing frequency
  (`mj.merge.msmoe`); its matching (weight or activation, the same for every
  block) is chosen per seed and size on the validation slice; both are
  reported too.
- M-SMoE without alignment, and a uniform average of the same groups
  (the ablations of frequency weighting and alignment).
- Dropping the least used experts (keeping the `num_groups` most used).
- MC-SMoE: the M-SMoE merge with every expert matrix stored as low rank +
  sparse (`mj.merge.compress_experts`), with its share of the expert
  parameters.

Merged models route to min(top_k, num_groups) experts. Prints a table of the
test score (accuracy, or the LM's perplexity on held-out text; mean and
standard deviation over seeds) and writes `<workdir>/moe.json`.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli
from experiments import evaluate
import mergejax as mj


def _is_text(ds) -> bool:
  return isinstance(ds, mj.data.TextDataset)


def _experts(config, ds) -> tuple[int, int]:
  """(num_experts, top_k) of the trained model."""
  m = config.model.moe if _is_text(ds) else config.model
  return m.num_experts, m.top_k


def _model(config, ds, num_experts=None):
  """The model of `config.model`, with `num_experts` experts in every block if given."""
  cfg = config.model.to_dict()
  e, k = _experts(config, ds)
  e = e if num_experts is None else num_experts
  if _is_text(ds):
    return mj.models.build("lm", **{**cfg, "moe": {"num_experts": e, "top_k": min(k, e)}})
  return mj.models.build("moe_mlp", num_classes=ds.num_classes, **{**cfg, "num_experts": e, "top_k": min(k, e)})


def train(config, model, x, y, seed: int):
  """Adam on cross-entropy plus `balance_loss` times Switch's load-balancing loss; returns variables.

  Cross-entropy is over every prediction (the classes, or each token's next
  byte); the balance loss is the mean over the model's MoE blocks of
  `E sum_e f_e p_e` (f: the share of rows dispatched to e, p: the mean
  router probability), every token a row.
  """
  variables = jax.jit(model.init)(jax.random.key(seed), x[:2])
  paths = mj.models.moe.block_paths(variables["params"])
  optimizer = optax.adam(config.learning_rate)

  def balance(router):
    e = router.shape[-1]
    router = router.reshape(-1, e)
    _, index = jax.lax.top_k(router, model.top_k)
    dispatched = jax.nn.one_hot(index, e).sum(-2).mean(0) / model.top_k  # f32[E], sums to 1
    return e * jnp.sum(jax.lax.stop_gradient(dispatched) * jax.nn.softmax(router).mean(0))

  def loss_fn(v, xb, yb):
    logits, state = model.apply(v, xb, mutable=["intermediates"])
    routers = [_block(state["intermediates"], path)["router_logits"][0] for path in paths]
    balance_loss = sum(balance(r) for r in routers) / len(routers)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean() + config.balance_loss * balance_loss

  @jax.jit
  def step(v, opt_state, xb, yb):
    grads = jax.grad(loss_fn)(v, xb, yb)
    updates, opt_state = optimizer.update(grads, opt_state, v)
    return optax.apply_updates(v, updates), opt_state

  opt_state = optimizer.init(variables)
  batches = mj.data.batches(x, y, batch_size=config.batch_size, seed=seed, epochs=None, drop_remainder=True)
  for _, (xb, yb) in zip(range(config.num_steps), batches):
    variables, opt_state = step(variables, opt_state, xb, yb)
  return variables


def _subset(xy, k, seed):
  """At most k of the (x, y) examples, drawn with `seed`, in order (all if k is None)."""
  n = len(xy[0])
  if k is None or k >= n:
    return xy
  keep = np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
  return xy[0][keep], xy[1][keep]


def _scorer(model, val_xy, test_xy, text: bool):
  """`variables -> {"val", "test"}`: accuracy, or perplexity for text; one compilation for both splits."""
  apply = jax.jit(model.apply)
  if text:
    return lambda v: {split: evaluate.perplexity(lambda ids: apply(v, ids), *xy)["perplexity"]
                      for split, xy in (("val", val_xy), ("test", test_xy))}
  x = np.concatenate([val_xy[0], test_xy[0]])
  n = len(val_xy[0])

  def score(variables):
    right = np.argmax(np.asarray(apply(variables, x)), -1) == np.concatenate([val_xy[1], test_xy[1]])
    return {"val": float(right[:n].mean()), "test": float(right[n:].mean())}

  return score


def merges(config, block, stats, num_groups: int) -> dict[str, dict]:
  """Method -> merged MoE block, for one block and size (M-SMoE's alignment done once per matching)."""
  groups = mj.merge.group_experts(stats.frequency, stats.logit_similarity, num_groups)
  out = {}
  for matching in config.matchings:
    aligned, _ = mj.merge.align_experts(block, groups, matching=matching, routing=stats)
    out[f"M-SMoE ({matching})"] = mj.merge.merge_expert_groups(aligned, groups, stats.frequency)
  out["M-SMoE, no alignment"] = mj.merge.merge_expert_groups(block, groups, stats.frequency)
  out["uniform average"] = mj.merge.merge_expert_groups(block, groups)
  keep = np.argsort(-np.asarray(stats.frequency), kind="stable")[:num_groups]
  out["drop least used"] = mj.merge.select_experts(block, keep)
  return out


def routing_stats(config, model, variables, x) -> dict:
  """Block path -> its RoutingStats (with the hidden moments) over the inputs x, one pass per block."""
  batches = lambda: mj.data.batches(x, batch_size=config.merge_batch_size, shuffle=False)  # noqa: E731
  out = {}
  for path in mj.models.moe.block_paths(variables["params"]):
    stat = mj.routing.routing_statistics(mj.models.moe.routing_fn(model, path), top_k=model.top_k,
                                         activations=True)
    out[path] = mj.stats.accumulate(stat, variables, batches, progress=False)
  return out


def _block(tree, path: str):
  """The node at a `/`-joined path of a tree (an MoE block's params, or what it sowed)."""
  for key in path.split("/"):
    tree = tree[key]
  return tree


def run_seed(config, ds, train_xy, val_xy, seed: int) -> dict:
  """Every method's validation and test score at every size, for one seed."""
  text = _is_text(ds)
  model = _model(config, ds)
  variables = train(config, model, *train_xy, seed)
  merge_x = _subset(train_xy, config.get("merge_examples"), config.data_seed)[0]
  stats = routing_stats(config, model, variables, merge_x)
  params = variables["params"]
  windows = config.get("eval_windows")
  val_xy = _subset(val_xy, windows, config.data_seed)
  test_xy = _subset((ds.x_test, ds.y_test), windows, config.data_seed)
  better = min if text else max
  result = {"full": _scorer(model, val_xy, test_xy, text)(variables),
            "frequency": {path: np.asarray(s.frequency).tolist() for path, s in stats.items()}, "sizes": {}}
  for g in config.num_groups:
    score = _scorer(_model(config, ds, g), val_xy, test_xy, text)
    by_block = {path: merges(config, _block(params, path), s, g) for path, s in stats.items()}
    names = next(iter(by_block.values()))
    merged = {name: {path: blocks[name] for path, blocks in by_block.items()} for name in names}
    rows = {name: score({"params": mj.models.moe.replace_blocks(params, b)}) for name, b in merged.items()}
    chosen = better(config.matchings, key=lambda m: rows[f"M-SMoE ({m})"]["val"])  # first of a tie
    rows["M-SMoE"] = {**rows[f"M-SMoE ({chosen})"], "matching": chosen}
    compressed, dense, kept = {}, 0, 0
    for path, b in merged[f"M-SMoE ({chosen})"].items():
      compressed[path], sizes = mj.merge.compress_experts(b, config.compress_rank, config.compress_density)
      dense, kept = dense + sizes["dense"], kept + sizes["compressed"]
    rows["MC-SMoE"] = {**score({"params": mj.models.moe.replace_blocks(params, compressed)}),
                       "expert_matrix_share": kept / dense}
    result["sizes"][str(g)] = rows
  return result


ORDER = ("M-SMoE", "M-SMoE (weight)", "M-SMoE (activation)", "M-SMoE, no alignment", "uniform average",
         "drop least used", "MC-SMoE")


def summarise(config, per_seed: dict, num_experts: int) -> dict:
  """Method -> size -> {"mean", "std"} of the test score over seeds (and the full model's)."""
  seeds = list(per_seed.values())
  out = {"full": {str(num_experts): evaluate.mean_std([s["full"]["test"] for s in seeds])}}
  present = seeds[0]["sizes"][str(config.num_groups[0])]
  for name in [n for n in ORDER if n in present]:
    out[name] = {str(g): evaluate.mean_std([s["sizes"][str(g)][name]["test"] for s in seeds]) for g in config.num_groups}
  return out


def run(config, workdir):
  workdir, ds, per_seed, start = evaluate.run_seeds(config, workdir, run_seed)
  e, k = _experts(config, ds)
  summary = summarise(config, per_seed, e)
  if _is_text(ds):
    what, cell = "held-out perplexity (lower is better)", lambda s: f"{s['mean']:.2f} ± {s['std']:.2f}"
    about = f"lm ({config.model.style}, depth {config.model.depth}) on {config.dataset}"
  else:
    what, cell = "test accuracy (%)", lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
    about = f"moe_mlp on {config.dataset}"
  print(f"\n{about}: {e} experts (top-{k}) per MoE block, {what}, mean ± std over seeds {tuple(config.seeds)}")
  print(f"{'method':24s}" + "".join(f"{f'{e} -> {g}':>16s}" for g in config.num_groups))
  full = cell(summary["full"][str(e)])
  print(f"{f'full ({e} experts)':24s}" + "".join(f"{full:>16s}" for _ in config.num_groups))
  for name, by_size in summary.items():
    if name != "full":
      print(f"{name:24s}" + "".join(f"{cell(by_size[str(g)]):>16s}" for g in config.num_groups))
  share = per_seed[str(config.seeds[0])]["sizes"][str(config.num_groups[0])]["MC-SMoE"]["expert_matrix_share"]
  print(f"MC-SMoE: rank {config.compress_rank} + density {config.compress_density} keeps"
        f" {100 * share:.0f}% of the merged experts' matrix entries")
  results = {"per_seed": per_seed, "summary": summary, "config": config.to_dict()}
  (workdir / "moe.json").write_text(json.dumps(results, indent=1))
  print(f"\nwrote {workdir / 'moe.json'} ({time.perf_counter() - start:.0f} s)")
  return results


if __name__ == "__main__":
  cli.main(run, about="Expert merging")
