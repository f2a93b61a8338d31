"""experiments.moe on tiny settings: every method runs on every size, and the table and JSON agree."""

import json

from experiments import moe
from experiments.configs import moe_digits
from experiments.configs import moe_lm_text


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


def test_moe_experiment_on_text_merges_the_lm_and_scores_perplexity(tmp_path, capsys):
  config = moe_lm_text.get_config()
  config.seeds = (0,)
  config.data_options.context = 8
  config.data_options.max_bytes = 3000
  config.validation_fraction = 0.1
  config.model.update(embed_dim=8, depth=1, num_heads=2, head_dim=4, mlp_dim=4, max_len=8)
  config.model.moe.update(num_experts=4, top_k=2)
  config.num_steps = 3
  config.merge_examples = 16
  config.eval_windows = 16
  config.num_groups = (2,)
  config.compress_rank = 2
  results = moe.run(config, tmp_path)
  seed = results["per_seed"]["0"]
  assert set(seed["frequency"]) == {"block0/moe"}  # the block's routing, top-2 of 4 experts
  assert all(abs(sum(f) - 2.0) < 1e-5 for f in seed["frequency"].values())
  rows = seed["sizes"]["2"]
  assert set(rows) == {"M-SMoE (weight)", "M-SMoE (activation)", "M-SMoE, no alignment", "uniform average",
                       "drop least used", "M-SMoE", "MC-SMoE"}
  chosen = rows["M-SMoE"]["matching"]
  assert rows["M-SMoE"]["val"] == min(rows[f"M-SMoE ({m})"]["val"] for m in ("weight", "activation"))
  assert rows["M-SMoE"]["test"] == rows[f"M-SMoE ({chosen})"]["test"]
  for row in [seed["full"], *rows.values()]:
    assert 1.0 < row["test"] < 1024  # a perplexity: above 1, near the bytes' uniform 256 when barely trained
  assert results["summary"]["M-SMoE"]["2"]["mean"] == rows["M-SMoE"]["test"]
  assert json.loads((tmp_path / "moe.json").read_text()) == json.loads(json.dumps(results))
  out = capsys.readouterr().out
  assert "held-out perplexity" in out and "4 -> 2" in out and "drop least used" in out
