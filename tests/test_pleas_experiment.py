"""experiments.pleas on small settings: every method runs, and least squares helps."""

import json

from experiments import pleas
from experiments.configs import pleas_mlp_digits


def test_pleas_table_json_and_plot(tmp_path, capsys):
  config = pleas_mlp_digits.get_config()
  config.model.config = {"features": (48, 48)}
  config.num_steps = 300
  config.warmup_steps = 20
  config.pleas.seeds = (0,)
  config.pleas.budgets = (1.0, 1.5)
  summary = pleas.run(config, tmp_path)
  assert set(summary) == {"model A", "model B", "ensemble", *config.pleas.methods}
  for method in config.pleas.methods:
    for budget in ("1.0", "1.5"):
      assert summary[method][budget]["flops"][0] <= float(budget) + 1e-9
  for method in ("PLeaS (weight)", "PLeaS (activation)", "PLeaS-free"):  # the paper's ordering
    assert summary[method]["1.0"]["joint"][0] > summary["permute and average"]["1.0"]["joint"][0]
  saved = json.loads((tmp_path / "pleas.json").read_text())
  assert len(saved["runs"]) == 3 + 2 * len(config.pleas.methods)
  assert (tmp_path / "pleas.png").stat().st_size > 0
  assert "PLeaS (weight)" in capsys.readouterr().out
