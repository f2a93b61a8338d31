"""experiments.ot_fusion on tiny settings: every row of both pairs, epsilon chosen on validation, the table
and the JSON."""

import json

import pytest

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
  config.ot_fusion.epsilons = (0.0, 0.1)
  saved = ot_fusion.run(config, tmp_path)
  results = saved["accuracy"]
  same, wider = results["same width"], results["wider into narrower"]
  fusions = ["OT (weight, exact)", "OT (activation, exact)", ot_fusion.CHOSEN, "B (or W) alone, OT to A's width"]
  assert list(same) == ["model A", "model B (or W)", "average", "weight matching + average", *fusions]
  assert list(wider) == ["model A", "model B (or W)", *fusions]  # no plain average of different widths
  assert same["model A"] == wider["model A"]  # one model A per seed
  assert all(0 <= a <= 1 and len(accs) == 1 for r in results.values() for accs in r.values() for a in accs)
  # One epsilon of the grid per seed and pair; exact OT chosen gives the exact activation row's test score.
  assert all(len(es) == 1 and es[0] in (0.0, 0.1) for es in saved["chosen_epsilon"].values())
  for pair, r in results.items():
    if saved["chosen_epsilon"][pair] == [0.0]:
      assert r[ot_fusion.CHOSEN] == r["OT (activation, exact)"]
  assert json.loads((tmp_path / "ot_fusion.json").read_text()) == saved
  table = capsys.readouterr().out
  assert all(label in table for label in same) and "epsilon chosen on validation" in table


def test_a_bad_epsilon_grid_fails_before_any_training(tmp_path):
  config = ot_fusion_mlp_digits.get_config()
  for epsilons in ((), (0.0, -0.1)):
    config.ot_fusion.epsilons = epsilons
    with pytest.raises(ValueError, match="ot_fusion.epsilons"):
      ot_fusion.run(config, tmp_path)
  assert not any(tmp_path.iterdir())
