"""experiments.pleas on small settings: every method runs, and least squares helps."""

import json

import numpy as np

from experiments import evaluate
from experiments import pleas
import mergejax as mj
from experiments.configs import pleas_mlp_digits


def _small_config():
  config = pleas_mlp_digits.get_config()
  config.model.config = {"features": (48, 48)}
  config.num_steps = 300
  config.warmup_steps = 20
  config.pleas.seeds = (0,)
  config.pleas.budgets = (1.0, 1.5)
  return config


def test_pleas_table_json_and_plot(tmp_path, capsys):
  config = _small_config()
  summary = pleas.run(config, tmp_path)
  assert set(summary) == {"model A", "model B", "ensemble", *config.pleas.methods}
  for method in config.pleas.methods:
    for budget in ("1.0", "1.5"):
      assert summary[method][budget]["flops"][0] <= float(budget) + 1e-9
  for method in ("PLeaS (weight)", "PLeaS (activation)", "PLeaS-free"):  # the paper's ordering
    assert summary[method]["1.0"]["joint"][0] > summary["permute and average"]["1.0"]["joint"][0]
  budgets = {"model A": "None", "ensemble": "None", **{m: "1.5" for m in config.pleas.methods}}
  for method, budget in budgets.items():  # a fresh probe per task, for every model
    assert {"probe task a", "probe task b"} <= set(summary[method][budget])
  assert summary["model A"]["None"]["probe task a"][0] > 0.8
  saved = json.loads((tmp_path / "pleas.json").read_text())
  assert len(saved["runs"]) == 3 + 2 * len(config.pleas.methods)
  assert (tmp_path / "pleas.png").stat().st_size > 0
  assert "PLeaS (weight)" in capsys.readouterr().out


def test_separate_heads_keep_each_models_task_head(tmp_path):
  config = _small_config()
  config.pleas.heads = "separate"
  config.pleas.budgets = (2.0,)
  config.pleas.methods = ("ZipIt!", "PLeaS (weight)")
  summary = pleas.run(config, tmp_path)
  for method in config.pleas.methods:  # both models whole, each with its own head: each task as its model
    assert summary[method]["2.0"]["task a"][0] >= summary["model A"]["None"]["task a"][0] - 0.02
    assert summary[method]["2.0"]["task b"][0] >= summary["model B"]["None"]["task b"][0] - 0.02


def test_probe_reads_linearly_separable_features_and_not_noise():
  rng = np.random.default_rng(0)
  y_train, y_test = rng.integers(3, 6, 300), rng.integers(3, 6, 100)
  centres = rng.standard_normal((10, 8)) * 4
  task = mj.data.Task("t", centres[y_train] + rng.standard_normal((300, 8)), y_train,
                      centres[y_test] + rng.standard_normal((100, 8)), y_test, 10, (3, 4, 5))
  assert evaluate.probe_accuracy(lambda x: x, [task]) == {"t": 1.0}
  noise = lambda x: np.random.default_rng(len(x)).standard_normal((len(x), 8))
  assert evaluate.probe_accuracy(noise, [task])["t"] < 0.6
