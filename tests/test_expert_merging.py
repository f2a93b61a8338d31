"""Tests for mergejax.merge.expert_merging: the alignment loss against NumPy, a single expert
recovered, the objective decreasing, importance-guided chunks, and errors."""

import jax
import numpy as np
import optax
import pytest

import mergejax as mj
from mergejax.merge.expert_merging import _task_vectors
from mergejax.merge.expert_merging import alignment_loss
from mergejax.merge.expert_merging import allocate_chunks
from mergejax.merge.expert_merging import layer_importance
from tests.test_twin import mlp_params


def mlp(variables, x):
  """x f32[n, 4] -> (logits f32[n, 3], {"h": the hidden layer f32[n, 8]})."""
  p = variables["params"]
  h = jax.nn.relu(x @ p["dense0"]["kernel"] + p["dense0"]["bias"])
  return h @ p["dense1"]["kernel"] + p["dense1"]["bias"], {"h": h}


def mlp_np(p, x):
  h = np.maximum(x @ p["dense0"]["kernel"] + p["dense0"]["bias"], 0)
  return h @ p["dense1"]["kernel"] + p["dense1"]["bias"], h


@pytest.fixture(scope="module")
def setting():
  """(base, [2 experts], [2 calibration sets of 8 inputs])."""
  rng = np.random.default_rng(0)
  base = mlp_params(rng, 1.0)
  experts = [mlp_params(rng, 0.5, base), mlp_params(rng, 0.5, base)]
  return base, experts, [rng.normal(size=(8, 4)).astype(np.float32) for _ in range(2)]


def test_alignment_loss_matches_numpy(setting):
  base, tuned, inputs = setting
  targets = [mlp(m, x) for m, x in zip(tuned, inputs)]
  got = alignment_loss(mlp, base, inputs, targets, hidden_weight=0.7, logit_weight=1.3, task_weights=[1.0, 2.0],
                          temperature=2.0)
  want = 0.0
  for w, m, x in zip([1.0, 2.0], tuned, inputs):
    lq, hq = mlp_np(base["params"], x.astype(np.float64))
    lp, hp = mlp_np(m["params"], x.astype(np.float64))
    p = np.exp(lp / 2 - np.log(np.sum(np.exp(lp / 2), -1, keepdims=True)))
    q = np.exp(lq / 2 - np.log(np.sum(np.exp(lq / 2), -1, keepdims=True)))
    kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
    want += w * (0.7 * np.mean(np.sum((hq - hp) ** 2, -1)) + 1.3 * kl)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_single_expert_hidden_alignment_recovers_it(setting):
  """One expert, hidden states only: lambda = 1 on the layer the hidden state depends on is exact (loss 0).

  The fit finds it; dense1's coefficients (leaves 2, 3 in flattening order) get no gradient and stay.
  """
  base, tuned, inputs = setting
  merged, info = mj.merge.expert_merging(mlp, base, tuned[:1], inputs[:1], logit_weight=0.0, steps=300,
                                         learning_rate=0.05, init=0.3)
  np.testing.assert_allclose(info.coefficients[:, :2], np.ones((1, 2)), atol=1e-2)
  np.testing.assert_array_equal(info.coefficients[:, 2:], np.full((1, 2), np.float32(0.3)))
  assert info.losses[-1] < 1e-3 * info.losses[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-2), merged["params"]["dense0"],
               tuned[0]["params"]["dense0"])


def test_objective_decreases_and_chunks_follow_importance(setting):
  base, tuned, inputs = setting
  blocks = {("params", layer, name): i for i, layer in enumerate(("dense0", "dense1")) for name in ("kernel", "bias")}
  blocks = {"/".join(k): v for k, v in blocks.items()}
  merged, info = mj.merge.expert_merging(mlp, base, tuned, inputs, blocks=blocks, chunks=5, steps=40, chunk_steps=40,
                                         learning_rate=0.02, reg_weight=0.01)
  losses = np.asarray(info.losses)
  assert losses.shape == (80,)
  assert losses[39] < losses[0] and losses[79] < losses[40] <= losses[39] * 1.01
  # Chunks: 2 layers, 1 each plus 5 shared by importance (dense1 holds at most 3: its output units).
  importance = layer_importance(info.layer_coefficients, _task_vectors(base, tuned), [0, 0, 1, 1])
  np.testing.assert_allclose(importance.sum(), 1.0)
  assert info.chunks.sum() == 7 and info.chunks[1] <= 3
  np.testing.assert_array_equal(info.chunks, allocate_chunks(importance, 5, np.array([8, 3])))
  assert info.coefficients.shape == (2, 7)
  # The merge is base + sum_k lambda[k, column of each output unit] tau_k, in NumPy.
  for layer in ("dense0", "dense1"):
    for name in ("kernel", "bias"):
      cols = np.asarray(info.columns["params"][layer][name])
      want = np.asarray(base["params"][layer][name], np.float64) + sum(
          np.asarray(info.coefficients)[k, cols] * (np.asarray(m["params"][layer][name], np.float64)
                                                    - base["params"][layer][name]) for k, m in enumerate(tuned))
      np.testing.assert_allclose(merged["params"][layer][name], want, atol=1e-5)


def test_allocate_chunks():
  np.testing.assert_array_equal(allocate_chunks(np.array([0.5, 0.3, 0.2]), 10, np.array([100] * 3)), [6, 4, 3])
  # A capped layer's share goes to the others.
  np.testing.assert_array_equal(allocate_chunks(np.array([0.8, 0.2]), 6, np.array([2, 100])), [2, 6])
  np.testing.assert_array_equal(allocate_chunks(np.array([0.5, 0.5]), 9, np.array([2, 3])), [2, 3])


def test_errors(setting):
  base, tuned, inputs = setting
  with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
    mj.merge.expert_merging(mlp, base, tuned, inputs, learning_rate=0.0)
  with pytest.raises(ValueError, match="reg_weight must be finite and >= 0"):
    mj.merge.expert_merging(mlp, base, tuned, inputs, reg_weight=-1.0)
  with pytest.raises(ValueError, match="chunks must be an integer >= 0"):
    mj.merge.expert_merging(mlp, base, tuned, inputs, chunks=-1)
  with pytest.raises(ValueError, match=r"inputs: need one calibration set per model \(2\)"):
    mj.merge.expert_merging(mlp, base, tuned, inputs[:1])
  with pytest.raises(ValueError, match=r"inputs\[1\]: every array needs"):
    mj.merge.expert_merging(mlp, base, tuned, [inputs[0], inputs[1][:0]])
  with pytest.raises(ValueError, match=r"apply_fn must return \(logits"):
    mj.merge.expert_merging(lambda v, x: mlp(v, x)[0], base, tuned, inputs)
  with pytest.raises(ValueError, match="task_weights: 2 models but 3"):
    mj.merge.expert_merging(mlp, base, tuned, inputs, task_weights=[1, 1, 1])
  with pytest.raises(ValueError, match=r"models\[0\] does not match"):
    mj.merge.expert_merging(mlp, base, [{"params": {}}], inputs[:1])
  with pytest.raises(ValueError, match="blocks: no block for leaf"):
    mj.merge.expert_merging(mlp, base, tuned, inputs, blocks={"params/dense0/kernel": 0}, optimizer=optax.sgd)
