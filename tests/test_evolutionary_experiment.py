"""experiments.evolutionary on tiny settings: every row runs, the table, JSON and plot agree."""

import json

import numpy as np
import pytest

from experiments import evolutionary
from experiments.configs import evolutionary_digits


def test_label_subsets_cover_every_class_cyclically():
  subsets = evolutionary.label_subsets(10, 6, 4)
  assert subsets[0] == [0, 1, 2, 3] and subsets[4] == [6, 7, 8, 9] and subsets[5] == [8, 9, 0, 1]
  assert set(np.concatenate(subsets)) == set(range(10))


def test_evolutionary_experiment_table_json_and_plot(tmp_path, capsys):
  config = evolutionary_digits.get_config()
  config.seeds = (0,)
  config.features = (8,)
  config.num_models = 3
  config.num_steps = 15
  config.generations = 4
  config.archive_size = 3
  config.mates = ("attraction",)
  results = evolutionary.run(config, tmp_path)
  seed = results["per_seed"]["0"]
  rows = seed["rows"]
  assert list(rows) == ["best single model", "uniform average", "M2N2 (attraction mates)",
                        "joint (all classes)"]
  for row in rows.values():
    assert 0.0 <= row["test"] <= 1.0
  best_val = seed["best_val"]["attraction"]
  assert len(best_val) == 5 and np.all(np.diff(best_val) >= 0)
  # The archive starts from the specialists, so its best is the best single model's.
  # (float32 means in evolve, float64 here.)
  assert best_val[0] == pytest.approx(rows["best single model"]["val"], rel=1e-6)
  assert rows["M2N2 (attraction mates)"]["val"] == pytest.approx(best_val[-1], rel=1e-6)
  assert json.loads((tmp_path / "evolutionary.json").read_text()) == json.loads(json.dumps(results))
  assert (tmp_path / "evolutionary.png").stat().st_size > 0
  out = capsys.readouterr().out
  assert "M2N2 (attraction mates)" in out and "uniform average" in out
