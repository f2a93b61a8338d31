"""experiments.rebasin on small settings: every method runs, and alignment helps."""

import json

from experiments import rebasin
from experiments.configs import rebasin_mlp_mnist1d


def test_rebasin_table_json_and_plot(tmp_path, capsys):
  config = rebasin_mlp_mnist1d.get_config()
  config.dataset = "digits"
  config.model.config = {"features": (48, 48)}
  config.num_steps = 300
  config.warmup_steps = 20
  config.rebasin.ste_steps = 5
  config.rebasin.num_points = 3  # t = 0, 1/2, 1: the barrier is at the midpoint, where REPAIR runs once a curve
  results = rebasin.run(config, tmp_path)
  labels = [m + r for m in ("naive", "weight", "activation", "ste") for r in ("", " + repair")]
  assert list(results) == labels
  assert results["weight"]["train_loss_barrier"] < results["naive"]["train_loss_barrier"]
  assert results["activation"]["train_loss_barrier"] < results["naive"]["train_loss_barrier"]
  for r in results.values():
    assert len(r["train loss"]) == 3
  assert json.loads((tmp_path / "rebasin.json").read_text()) == results
  assert (tmp_path / "rebasin.png").stat().st_size > 0
  assert "weight matching removes" in capsys.readouterr().out
