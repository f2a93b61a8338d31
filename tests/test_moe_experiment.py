"""experiments.moe on tiny settings: every method runs on every size, and the table and JSON agree."""

import json

from experiments import moe
from experiments.configs import moe_digits


def test_moe_experiment_table_and_json(tmp_path, capsys):
  config = moe_digits.get_config()
  config.seeds = (0,)
  config.model.features = (16,)
  config.model.num_experts = 4
  config.model.expert_features = 8
  config.num_steps = 20
  config.num_groups = (2,)
  config.compress_rank = 2
  results = moe.run(config, tmp_path)
  rows = results["per_seed"]["0"]["sizes"]
  assert list(rows) == ["2"]
  for by_method in rows.values():
    assert set(by_method) == {"M-SMoE (weight)", "M-SMoE (activation)", "M-SMoE, no alignment",
                              "uniform average", "drop least used", "M-SMoE", "MC-SMoE"}
    assert by_method["M-SMoE"]["matching"] in ("weight", "activation")
    assert by_method["M-SMoE"]["test"] == by_method[f"M-SMoE ({by_method['M-SMoE']['matching']})"]["test"]
    assert 0 < by_method["MC-SMoE"]["expert_matrix_share"] < 1
    for row in by_method.values():
      assert 0.0 <= row["test"] <= 1.0
  assert json.loads((tmp_path / "moe.json").read_text()) == json.loads(json.dumps(results))
  out = capsys.readouterr().out
  assert "4 -> 2" in out and "MC-SMoE" in out and "drop least used" in out
