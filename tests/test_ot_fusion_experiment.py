"""experiments.ot_fusion on tiny settings: every row of both pairs, the table and the JSON."""

import json

from experiments import ot_fusion
from experiments.configs import ot_fusion_mlp_digits


def test_ot_fusion_table_and_json(tmp_path, capsys):
  config = ot_fusion_mlp_digits.get_config()
  config.num_steps = 30
  config.warmup_steps = 5
  config.checkpoint_every = 30
  config.model.config.features = (16, 16)
  config.ot_fusion.wide_features = (24, 24)
  config.ot_fusion.seeds = (0,)
  config.ot_fusion.batch_size = 64
  results = ot_fusion.run(config, tmp_path)
  same, wider = results["same width"], results["wider into narrower"]
  fusions = ["OT (weight, exact)", "OT (activation, exact)", "OT (activation, Sinkhorn)",
             "B (or W) alone, OT to A's width"]
  assert list(same) == ["model A", "model B (or W)", "average", "weight matching + average", *fusions]
  assert list(wider) == ["model A", "model B (or W)", *fusions]  # no plain average of different widths
  assert same["model A"] == wider["model A"]  # one model A per seed
  assert all(0 <= a <= 1 and len(accs) == 1 for r in results.values() for accs in r.values() for a in accs)
  assert json.loads((tmp_path / "ot_fusion.json").read_text()) == results
  table = capsys.readouterr().out
  assert all(label in table for label in same)
