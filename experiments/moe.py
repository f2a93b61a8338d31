r"""Expert merging in a sparse mixture of experts: M-SMoE and MC-SMoE against simple baselines.

    python -m experiments.moe --config=experiments/configs/moe_digits.py --workdir=/tmp/moe

Per seed: trains a `moe_mlp` classifier (a Switch load-balancing loss keeps
the experts in use) on the training data less a validation slice, gathers
its routing statistics on the training inputs (unlabelled,
`mj.routing.routing_statistics`), and merges its E experts into each of
`num_groups` by:

- M-SMoE: experts grouped around the most used ones by router-logit
  similarity, aligned to their dominant expert, merged by routing frequency
  (`mj.merge.msmoe`); its matching (weight or activation) is chosen per seed
  and size on the validation slice; both are reported too.
- M-SMoE without alignment, and a uniform average of the same groups
  (the ablations of frequency weighting and alignment).
- Dropping the least used experts (keeping the `num_groups` most used).
- MC-SMoE: the M-SMoE merge with every expert matrix stored as low rank +
  sparse (`mj.merge.compress_experts`), with its share of the expert
  parameters.

Merged models route to min(top_k, num_groups) experts. Prints a table of
test accuracy (mean and standard deviation over seeds) and writes
`<workdir>/moe.json`.
"""

import json
import pathlib
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli
from experiments import evaluate
import mergejax as mj


def _data(config):
  """(dataset, (x, y) train, (x, y) validation): the validation slice is held out of training."""
  ds = mj.data.load(config.dataset, seed=config.data_seed)
  order = np.random.default_rng(config.data_seed).permutation(len(ds.x_train))
  n_val = int(round(config.validation_fraction * len(order)))
  val, train = order[:n_val], order[n_val:]
  return ds, (ds.x_train[train], ds.y_train[train]), (ds.x_train[val], ds.y_train[val])


def _model(config, num_classes, num_experts=None):
  cfg = dict(config.model)
  if num_experts is not None:
    cfg.update(num_experts=num_experts, top_k=min(cfg["top_k"], num_experts))
  return mj.models.build("moe_mlp", num_classes=num_classes, **cfg)


def train(config, model, x, y, seed: int):
  """Adam on cross-entropy plus `balance_loss` times Switch's load-balancing loss; returns variables."""
  variables = jax.jit(model.init)(jax.random.key(seed), x[:2])
  optimizer = optax.adam(config.learning_rate)
  k, e = model.top_k, model.num_experts

  def loss_fn(v, xb, yb):
    logits, state = model.apply(v, xb, mutable=["intermediates"])
    router = state["intermediates"]["moe"]["router_logits"][0]
    _, index = jax.lax.top_k(router, k)
    dispatched = jax.nn.one_hot(index, e).sum(-2).mean(0) / k  # f32[E], sums to 1
    balance = e * jnp.sum(jax.lax.stop_gradient(dispatched) * jax.nn.softmax(router).mean(0))
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean() + config.balance_loss * balance

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


def _scorer(model, val_xy, test_xy):
  """`variables -> {"val", "test"}` accuracy, one compilation for both splits."""
  apply = jax.jit(model.apply)
  x = np.concatenate([val_xy[0], test_xy[0]])
  n = len(val_xy[0])

  def score(variables):
    right = np.argmax(np.asarray(apply(variables, x)), -1) == np.concatenate([val_xy[1], test_xy[1]])
    return {"val": float(right[:n].mean()), "test": float(right[n:].mean())}

  return score


def merges(config, block, stats, num_groups: int) -> dict[str, dict]:
  """Method -> merged MoE block, for one size (M-SMoE's alignment done once per matching)."""
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


def run_seed(config, ds, train_xy, val_xy, seed: int) -> dict:
  """Every method's validation and test accuracy at every size, for one seed."""
  model = _model(config, ds.num_classes)
  variables = train(config, model, *train_xy, seed)
  batches = lambda: mj.data.batches(train_xy[0], batch_size=config.merge_batch_size, shuffle=False)  # noqa: E731
  stat = mj.routing.routing_statistics(mj.models.moe.routing_fn(model), top_k=model.top_k, activations=True)
  stats = mj.stats.accumulate(stat, variables, batches, progress=False)
  block = variables["params"]["moe"]
  test_xy = (ds.x_test, ds.y_test)
  result = {"full": _scorer(model, val_xy, test_xy)(variables), "frequency": np.asarray(stats.frequency).tolist(),
            "sizes": {}}
  for g in config.num_groups:
    score = _scorer(_model(config, ds.num_classes, g), val_xy, test_xy)
    merged = merges(config, block, stats, g)
    rows = {name: score({"params": {**variables["params"], "moe": b}}) for name, b in merged.items()}
    chosen = max(config.matchings, key=lambda m: rows[f"M-SMoE ({m})"]["val"])  # first of a tie
    rows["M-SMoE"] = {**rows[f"M-SMoE ({chosen})"], "matching": chosen}
    compressed, sizes = mj.merge.compress_experts(merged[f"M-SMoE ({chosen})"], config.compress_rank,
                                                  config.compress_density)
    rows["MC-SMoE"] = {**score({"params": {**variables["params"], "moe": compressed}}),
                       "expert_matrix_share": sizes["compressed"] / sizes["dense"]}
    result["sizes"][str(g)] = rows
  return result


ORDER = ("M-SMoE", "M-SMoE (weight)", "M-SMoE (activation)", "M-SMoE, no alignment", "uniform average",
         "drop least used", "MC-SMoE")


def summarise(config, per_seed: dict) -> dict:
  """Method -> size -> {"mean", "std"} of test accuracy over seeds (and the full model's)."""
  seeds = list(per_seed.values())
  out = {"full": {str(config.model.num_experts): evaluate.mean_std([s["full"]["test"] for s in seeds])}}
  present = seeds[0]["sizes"][str(config.num_groups[0])]
  for name in [n for n in ORDER if n in present]:
    out[name] = {str(g): evaluate.mean_std([s["sizes"][str(g)][name]["test"] for s in seeds]) for g in config.num_groups}
  return out


def _cell(stat: dict) -> str:
  return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def run(config, workdir):
  start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ds, train_xy, val_xy = _data(config)
  per_seed = {}
  for seed in config.seeds:
    per_seed[str(seed)] = run_seed(config, ds, train_xy, val_xy, seed)
    logging.info("seed %d done, %.0f s", seed, time.perf_counter() - start)
  summary = summarise(config, per_seed)
  e = config.model.num_experts
  print(f"\nmoe_mlp on {config.dataset}: {e} experts (top-{config.model.top_k}), test accuracy (%),"
        f" mean ± std over seeds {tuple(config.seeds)}")
  header = f"{'method':24s}" + "".join(f"{f'{e} -> {g}':>16s}" for g in config.num_groups)
  print(header)
  full = _cell(summary["full"][str(e)])
  print(f"{f'full ({e} experts)':24s}" + "".join(f"{full:>16s}" for _ in config.num_groups))
  for name, by_size in summary.items():
    if name != "full":
      print(f"{name:24s}" + "".join(f"{_cell(by_size[str(g)]):>16s}" for g in config.num_groups))
  share = per_seed[str(config.seeds[0])]["sizes"][str(config.num_groups[0])]["MC-SMoE"]["expert_matrix_share"]
  print(f"MC-SMoE: rank {config.compress_rank} + density {config.compress_density} keeps"
        f" {100 * share:.0f}% of the merged experts' matrix entries")
  results = {"per_seed": per_seed, "summary": summary, "config": config.to_dict()}
  (workdir / "moe.json").write_text(json.dumps(results, indent=1))
  print(f"\nwrote {workdir / 'moe.json'} ({time.perf_counter() - start:.0f} s)")
  return results


if __name__ == "__main__":
  cli.main(run, about="Expert merging")
