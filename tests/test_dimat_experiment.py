"""experiments.dimat on tiny settings: every method's curve, the table, the JSON and the plot."""

import json

from experiments import dimat
from experiments.configs import dimat_digits


def test_dimat_table_json_and_plot(tmp_path, capsys):
  config = dimat_digits.get_config()
  config.seeds = (0,)
  config.agents = 2
  config.features = (16, 16)
  config.pretrain_rounds = 2
  config.rounds = 1
  config.steps_per_round = 5
  config.align_batches = 1
  config.align_batch_size = 64
  results = dimat.run(config, tmp_path)
  curves = results["curves"]
  assert list(curves) == list(dimat.METHODS)
  assert all(len(c) == 1 and len(c[0]) == 2 for c in curves.values())  # one seed; rounds 0 and 1
  assert len({c[0][0] for c in curves.values()}) == 1  # every method starts from the same agents
  assert all(0 <= a <= 1 for c in curves.values() for a in c[0])
  assert json.loads((tmp_path / "dimat.json").read_text()) == results
  assert (tmp_path / "dimat_rounds.png").stat().st_size > 0
  table = capsys.readouterr().out
  assert all(method in table for method in dimat.METHODS)


def test_shards_hold_their_classes_and_the_shared_slice():
  config = dimat_digits.get_config()
  dataset = dimat.mj.data.load(config.dataset, seed=config.data_seed)
  shards = dimat.shards(config, dataset)
  shared = set.intersection(*(set(s.tolist()) for s in shards))
  assert abs(len(shared) - round(config.shared_fraction * len(dataset.y_train))) <= 0
  groups = [(0, 1, 2), (3, 4, 5), (6, 7), (8, 9)]
  for s, g in zip(shards, groups, strict=True):
    own = set(s.tolist()) - shared
    assert set(dataset.y_train[list(own)].tolist()) == set(g)
    assert own == set(i for i in range(len(dataset.y_train)) if dataset.y_train[i] in g) - shared
