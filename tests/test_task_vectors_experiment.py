"""experiments.task_vectors on small settings: every method has a row, and the protocol holds."""

import json

import numpy as np
import pytest

from experiments import task_vectors
from experiments.configs import task_vectors_mlp_digits
import mergejax as mj


def _small_config():
  config = task_vectors_mlp_digits.get_config()
  config.model.config = {"features": (32, 32)}
  config.num_steps = 300
  config.warmup_steps = 20
  config.task_vectors.seeds = (0,)
  config.task_vectors.finetune = {"num_steps": 60, "learning_rate": 3e-4, "warmup_steps": 5}
  config.task_vectors.sweeps = {
      "average": {},
      "greedy_soup": {},
      "task_arithmetic": {"scale": (0.0, 0.5, 1.0)},
      "ties": {"density": (0.2, 1.0), "scale": (1.0,)},
      "dare": {"drop": (0.5,), "scale": (0.5, 1.0)},
      "dare_ties": {"drop": (0.5,), "density": (0.5,), "scale": (1.0,)},
      "fisher": {"epsilon": (1e-8, 1e-4)},
      "regmean": {"alpha": (0.5, 0.9)},
      "regmean_plus_plus": {"alpha": (0.9,)},
      "lines": {"beta": (0.0, 1.0)},
      "consensus_task_arithmetic": {"k": (0,), "scale": (0.5,)},
      "consensus_ties": {"k": (2,), "density": (0.5,), "scale": (1.0,)},
      "tall_masks": {"lambda_t": (0.4,)},
      "sce": {"density": (0.5,), "scale": (1.0,)},
      "doge": {"density": (0.3,), "scale": (1.0,)},
      "pcb": {"density": (0.1,), "scale": (1.0,)},
      "widen": {"above_average_ratio": (1.0,), "calibrated_score": (0.5,)},
      "metric_weighted": {"penalty": (0.0, 2.0)},
      "ota": {"power": (0.5,)},
      "opcm": {"opcm_alpha": (0.5,), "order": (0, 1)},
      "lora_arithmetic": {"rank": (4,), "scale": (0.5,)},
      "lora_lego": {"rank": (4,), "merged_rank": (4,), "scale": (1.0,)},
      "reversible_lora": {"rank": (4,), "num_basis": (5,)},
      "fw_merging": {"fw_steps": (3,), "fw_soft": (0,), "fw_line_search": (1,)},
      "fw_merging_soft": {"fw_steps": (2,), "fw_ada_lr": (0.01,), "fw_ada_steps": (10,)},
      "map": {"map_samples": (24,), "map_divisions": (2,)},
      "map_bayesian": {"map_samples": (24,), "map_rounds": (1,), "map_divisions": (2,)},
      "map_nested": {"map_samples": (6,), "map_divisions": (2,)},
      "adamerging_task": {"ada_lr": (0.01,), "ada_steps": (0, 20)},
      "adamerging_layer": {"ada_lr": (0.01,), "ada_steps": (20,)},
      "concrete_task_arithmetic": {"mask_lr": (0.1,), "mask_steps": (10,), "scale": (0.3,)},
      "concrete_adamerging": {"ada_lr": (0.01,), "ada_steps": (10,), "mask_lr": (0.1,)},
      "twin_merging": {"twin_rank": (2,), "scale": (0.3,)},
      "expert_merging": {"em_lr": (0.03,), "em_steps": (10,), "em_chunks": (0,)},
  }
  return config


def test_every_method_has_a_row_chosen_on_validation(tmp_path, capsys):
  config = _small_config()
  summary = task_vectors.run(config, tmp_path)
  members = list(config.members)
  names = [name for name, _ in task_vectors.METHODS.values()]
  assert set(summary) == {"base", "multi-task", "fine-tuned, own task", *(f"fine-tuned {m}" for m in members),
                          *names}
  table = capsys.readouterr().out
  for method in summary:
    assert method in table

  saved = json.loads((tmp_path / "task_vectors.json").read_text())
  assert (tmp_path / "task_vectors.png").stat().st_size > 0
  assert (tmp_path / "map_pareto_front.png").stat().st_size > 0
  assert (tmp_path / "adamerging_coefficients.png").stat().st_size > 0
  runs = saved["runs"]
  sizes = {m: len(task_vectors.grid(m, s)) for m, s in config.task_vectors.sweeps.items()}
  assert len(runs) == 3 + len(members) + sum(sizes.values())
  for method, (name, _) in task_vectors.METHODS.items():
    assert len(summary[name]["sweep"]) == sizes[method]

  by = lambda method, **setting: next(r for r in runs if r["method"] == method and r["setting"] == setting)
  base = by("base")
  # Scale 0 adds nothing to the base: the very same predictions.
  zero = by("task arithmetic", scale=0.0)
  assert zero["validation"] == base["validation"] and zero["test"] == base["test"]
  # Each fine-tuned model is at least as good as the base on its own task, and better on average.
  own = by("fine-tuned, own task")
  for m in members:
    assert own["test"][m] == by(f"fine-tuned {m}")["test"][m] >= base["test"][m]
  assert own["test"]["average"] > base["test"]["average"]
  # Greedy soups pick their ingredients among the task models, on validation.
  assert set(by("greedy soup")["ingredients"]) <= set(members)
  # Identities through the experiment: consensus over k = 0 masks is task arithmetic, and a metric
  # penalty of 0 weighs the models equally.
  assert by("Consensus TA", k=0.0, scale=0.5)["test"] == by("task arithmetic", scale=0.5)["test"]
  assert by("metrics-weighted average", penalty=0.0)["test"] == by("average")["test"]
  # OPCM's spread over its two task orders, at the chosen opcm_alpha, is printed and saved.
  orders = [by("OPCM (continual)", opcm_alpha=0.5, order=float(o))["test"]["average"] for o in (0, 1)]
  assert saved["opcm_order_spread"] == pytest.approx(
      {"opcm_alpha": 0.5, "orders": 2, "mean": np.mean(orders), "std": np.std(orders), "min": min(orders),
       "max": max(orders)})
  assert "OPCM over 2 task orders" in table
  # FW-merging lowers the tasks' summed training loss from the base; MAP's merge is a front point.
  losses = by("FW-merging", fw_steps=3.0, fw_soft=0.0, fw_line_search=1.0)["fw_losses"]
  # FW-Soft: as many tasks as task models, so every step picks all five and learns a weight for each.
  soft = by("FW-merging (soft)", fw_steps=2.0, fw_ada_lr=0.01, fw_ada_steps=10.0)
  assert [sorted(picks) for picks in soft["fw_chosen"]] == [sorted(members)] * 2
  assert [len(w) for w in soft["fw_weights"]] == [5, 5] and soft["fw_losses"][-1] < soft["fw_losses"][0]
  assert len(losses) == 4 and losses[-1] < losses[0]
  map_run = by("MAP (front point chosen on validation)", map_samples=24.0, map_divisions=2.0)
  assert 1 <= map_run["map_front_size"] <= 15 and len(map_run["map_coefficients"]) == len(members)
  # Bayesian MAP spends MAP's 24 merges: a quadratic's 21 terms, then one adaptive round of 3; nested MAP
  # scores each task model, then 6 + 1 merges for each of its 4 pairs.
  bayesian = by("MAP (Bayesian, front point chosen on validation)", map_samples=24.0, map_rounds=1.0,
                map_divisions=2.0)
  assert bayesian["map_evaluations"] == map_run["map_evaluations"] == 24 and bayesian["map_schedule"] == [21, 3]
  nested = by("MAP (nested, equal preferences)", map_samples=6.0, map_divisions=2.0)
  assert nested["map_evaluations"] == 5 + 4 * 7 and len(nested["map_pairs"]) == 4
  assert sorted(sum(nested["map_pairs"][-1], [])) == sorted(members)
  # AdaMerging starts every coefficient at 0.3 and learns them on the fitting inputs; layer-wise has
  # one per task and leaf; Concrete's masks are in [0, 1].
  assert by("AdaMerging (task-wise)", ada_lr=0.01, ada_steps=0.0)["coefficients"] == [pytest.approx(0.3)] * 5
  assert by("AdaMerging (task-wise)", ada_lr=0.01, ada_steps=20.0)["coefficients"] != [pytest.approx(0.3)] * 5
  layer_wise = np.array(by("AdaMerging (layer-wise)", ada_lr=0.01, ada_steps=20.0)["coefficients"])
  assert layer_wise.shape == (len(members), 6)  # the MLP's three kernels and biases
  assert 0 < by("Concrete TA", mask_lr=0.1, mask_steps=10.0, scale=0.3)["mask_mean"] < 1
  # Compressions score each task on its own reconstructed model: they have no joint accuracy.
  for name, setting in (("TALL masks (per task)", {"lambda_t": 0.4}),
                        ("reversible low-rank (per task)", {"num_basis": 5.0, "rank": 4.0})):
    assert "joint" not in by(name, **setting)["test"]
    assert by(name, **setting)["test"]["average"] > base["test"]["average"]

  # The reported setting has the best validation average; its test scores are those runs'.
  for name, _ in task_vectors.METHODS.values():
    sweep = [r for r in runs if r["method"] == name]
    best = sweep[int(np.argmax([r["validation"]["average"] for r in sweep]))]
    assert summary[name]["setting"] == best["setting"]
    for column, (mean, std) in summary[name]["test"].items():
      assert (mean, std) == pytest.approx((best["test"][column], 0.0))
    assert saved["summary"][name]["setting"] == best["setting"]


def test_hold_out_splits_the_training_examples_without_overlap():
  y = np.repeat([3, 7], 50)
  x = np.repeat(np.arange(100, dtype=np.float32)[:, None], 4, axis=1)  # x[i] holds i
  task = mj.data.Task("t", x, y, x[:10], y[:10], 10, (3, 7))
  fit, val = task_vectors.hold_out(task, 0.2, seed=1)
  assert len(val.x_test) == 20 and len(fit.x_train) == 80
  ids = np.concatenate([fit.x_train[:, 0], val.x_test[:, 0]])
  np.testing.assert_array_equal(np.sort(ids), x[:, 0])  # a partition of the training examples
  np.testing.assert_array_equal(val.y_test, y[val.x_test[:, 0].astype(int)])  # labels follow
  np.testing.assert_array_equal(fit.x_test, task.x_test)  # the test set is untouched
  np.testing.assert_array_equal(val.x_train, fit.x_train)
  with pytest.raises(ValueError, match="holds out 0"):
    task_vectors.hold_out(task, 0.001, seed=1)


def test_grid_follows_the_method_parameter_order():
  assert task_vectors.grid("dare_ties", {"scale": (1, 2), "density": (0.5,), "drop": (0.1, 0.9)}) == [
      {"drop": 0.1, "density": 0.5, "scale": 1.0}, {"drop": 0.1, "density": 0.5, "scale": 2.0},
      {"drop": 0.9, "density": 0.5, "scale": 1.0}, {"drop": 0.9, "density": 0.5, "scale": 2.0}]
  assert task_vectors.grid("average", {}) == [{}]


def _set(path, value):
  def edit(config):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return edit


@pytest.mark.parametrize("edit, message", [
    (_set("task_vectors.sweeps.soup", {}), "unknown method 'soup'"),
    (_set("task_vectors.sweeps.ties", {"density": (0.5,)}), r"sweeps.ties sweeps \['density'\]"),
    (_set("task_vectors.sweeps.ties.density", (0.0, 0.5)), r"sweeps.ties.density .* in \(0, 1\]"),
    (_set("task_vectors.sweeps.dare.drop", (1.0,)), r"sweeps.dare.drop .* in \[0, 1\)"),
    (_set("task_vectors.sweeps.regmean.alpha", (1.5,)), r"sweeps.regmean.alpha .* in \[0, 1\]"),
    (_set("task_vectors.sweeps.fisher.epsilon", (0.0,)), "sweeps.fisher.epsilon .* > 0"),
    (_set("task_vectors.sweeps.task_arithmetic.scale", ()), "sweeps.task_arithmetic.scale"),
    (_set("task_vectors.validation_fraction", 1.0), "validation_fraction 1.0 not in"),
    (_set("task_vectors.seeds", ()), "seeds is empty"),
    (_set("task_vectors.finetune.warmup_steps", 200), "finetune.warmup_steps 200 not in"),
    (_set("members", ("t01", "t23", "t45", "t67", "base")), "must be distinct and not 'base'"),
    (_set("task_vectors.base_transforms", (("sharpen", {}),)), "sharpen"),
])
def test_bad_config_fails_before_any_work(tmp_path, edit, message):
  config = _small_config()
  edit(config)
  with pytest.raises(ValueError, match=message):
    task_vectors.run(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()
