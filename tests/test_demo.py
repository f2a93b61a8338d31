"""Tests for experiments.demo (`make demo`) on a short training run."""

import json

from experiments import demo
from experiments.configs import digits_mlp_pair


def test_demo_prints_the_table_and_writes_the_plot(tmp_path, capsys):
  config = digits_mlp_pair.get_config()
  config.num_steps = 150
  rows = demo.run(config, tmp_path)
  printed = capsys.readouterr().out
  assert list(rows) == ["model A", "model B", "ensemble", "average", "aligned average",
                        "PLeaS, budget 1.0", "PLeaS, budget 1.5"]
  for name in rows:
    assert name in printed
  task_a, task_b = list(rows["model A"])[:2]
  # Each model is good on its own half and its ensemble on both.
  assert rows["model A"][task_a] > 0.8 and rows["model B"][task_b] > 0.8
  assert min(rows["ensemble"][task_a], rows["ensemble"][task_b]) > 0.6
  assert rows["PLeaS, budget 1.0"]["joint"] > rows["aligned average"]["joint"]
  assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((tmp_path / "results.json").read_text()) == rows
