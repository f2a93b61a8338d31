"""Tests for experiments.train: accuracy, resumption, and errors before work."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import train
from experiments.configs import digits_mlp_pair
import mergejax as mj

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(**overrides):
  config = digits_mlp_pair.get_config()
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def test_mlp_on_digits_half_reaches_95_percent_and_loss_decreases(tmp_path):
  members, _, variables, metrics = train.train_pair(_config(), tmp_path)
  assert [m.name for m in members] == ["a", "b"]
  for m in metrics:
    assert m["test_accuracy"] >= 0.95, m
    losses = [loss for _, loss in m["losses"]]
    assert losses[-1] < 0.5 * losses[0]
  # Different seeds and tasks give different models.
  assert not np.allclose(
      variables[0]["params"]["hidden_0"]["kernel"], variables[1]["params"]["hidden_0"]["kernel"]
  )
  # Outputs on disk: a restorable model with metadata, and metrics.
  meta = mj.io.load_metadata(tmp_path / "a" / "model")
  assert meta["model"] == "mlp" and meta["task"] == members[0].task.name
  assert meta["classes"] == list(members[0].task.classes)
  restored = mj.io.restore(tmp_path / "a" / "model", like=variables[0])
  mj.tree.check_same_shapes(restored, variables[0], dtypes=True)
  assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_resumes_from_checkpoint_to_the_same_model(tmp_path, monkeypatch):
  config = _config(num_steps=120, checkpoint_every=50, log_every=10)
  _, _, (straight, _), _ = train.train_pair(config, tmp_path / "straight")

  real = train.make_train_step

  def crashing(model, optimizer):
    step = real(model, optimizer)

    def wrapped(state, x, y):
      if int(state["step"]) == 70:
        raise KeyboardInterrupt("simulated preemption")
      return step(state, x, y)

    return wrapped

  monkeypatch.setattr(train, "make_train_step", crashing)
  with pytest.raises(KeyboardInterrupt):
    train.train_pair(config, tmp_path / "resumed")
  assert not (tmp_path / "resumed" / "a" / "model").exists()
  monkeypatch.setattr(train, "make_train_step", real)
  _, _, (resumed, _), metrics = train.train_pair(config, tmp_path / "resumed")
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  # The loss curve is whole: logged steps before and after the interruption.
  assert [s for s, _ in metrics[0]["losses"]] == list(range(10, 121, 10))


def test_reuses_a_finished_model(tmp_path, monkeypatch):
  config = _config(num_steps=20, warmup_steps=5)
  _, _, first, _ = train.train_pair(config, tmp_path)
  monkeypatch.setattr(train, "make_train_step", None)  # training again would fail
  _, _, again, _ = train.train_pair(config, tmp_path)
  for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dataset": "cifar"}, "cifar"),
        ({"members": ("a", "b", "c")}, "3 models but split 'disjoint_labels' makes 2 tasks"),
        ({"batch_size": 5000}, "batch_size 5000 not in"),
        ({"warmup_steps": 1000}, "warmup_steps 1000 not in"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.train_pair(_config(**overrides), tmp_path / "work")
  assert not (tmp_path / "work").exists()


def test_bad_model_config_fails_before_any_work(tmp_path):
  config = _config()
  config.model.config.depth = 3
  with pytest.raises(ValueError, match="depth"):
    train.train_pair(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()


def test_unknown_config_key_on_the_command_line_is_an_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train",
       "--config=experiments/configs/digits_mlp_pair.py", f"--workdir={tmp_path / 'work'}",
       "--config.learnig_rate=0.1"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
  )
  assert result.returncode != 0
  assert "learnig_rate" in result.stderr
  assert not (tmp_path / "work").exists()


def test_trains_a_batch_norm_model_and_keeps_its_statistics(tmp_path):
  config = _config(num_steps=12, warmup_steps=2, log_every=4, checkpoint_every=100)
  config.model.name = "resnet20"
  config.model.config = {"stage_widths": (4, 4, 4), "blocks": (1, 1, 1)}
  members, model, variables, _ = train.train_pair(config, tmp_path)
  initial = train.init_variables(model, members[0].seed, members[0].task.x_train)
  trained = variables[0]["batch_stats"]
  assert jax.tree.structure(trained) == jax.tree.structure(initial["batch_stats"])
  for before, after in zip(jax.tree.leaves(initial["batch_stats"]), jax.tree.leaves(trained)):
    assert not np.allclose(before, after)  # running statistics were updated
  restored = mj.io.restore(tmp_path / "a" / "model", like=variables[0])
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(variables[0])):
    np.testing.assert_array_equal(x, y)
