"""Tests for mergejax.io.convert.gpt2 and .llama, live against transformers' PyTorch models.

Tiny random-init HF models, built from configs with a fixed torch seed
(nothing is downloaded), with every parameter perturbed so that no norm scale
is 1 and no bias 0 (a swapped scale and bias or a missed transpose shows in
the logits). The oracle is transformers itself: its logits on the same ids,
its `from_pretrained` on what we write back.
"""

import functools
import types

import jax
import ml_dtypes
import numpy as np
import pytest

import mergejax as mj
from mergejax import models
from mergejax.io.convert import gpt2
from mergejax.io.convert import llama
from mergejax.models import lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

IDS = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # inside the 256-byte vocabulary
# name -> (converter module, HF model class name, HF config class name, config kwargs)
CASES = {
    "gpt2": (gpt2, "GPT2LMHeadModel", "GPT2Config",
             dict(n_layer=2, n_embd=32, n_head=4, vocab_size=256, n_positions=64, layer_norm_epsilon=1e-4)),
    "gpt2_untied": (gpt2, "GPT2LMHeadModel", "GPT2Config",
                    dict(n_layer=2, n_embd=32, n_head=4, vocab_size=256, n_positions=64, n_inner=48,
                         tie_word_embeddings=False)),
    # GQA (4 query heads, 2 kv heads), a RoPE base and RMSNorm epsilon that are not the defaults.
    "llama": (llama, "LlamaForCausalLM", "LlamaConfig",
              dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
                   max_position_embeddings=64)),
    # Multi-query, head_dim not hidden/heads, biases, tied head.
    "llama_tied": (llama, "LlamaForCausalLM", "LlamaConfig",
                   dict(vocab_size=256, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=12, attention_bias=True,
                        mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=64)),
}


def _hf_model(name, seed):
  """A perturbed random-init HF model of case `name` (eval mode, float32)."""
  _, model_cls, config_cls, kwargs = CASES[name]
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs, **TOKENS))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def _hf_logits(model):
  with torch.no_grad():
    return model(torch.from_numpy(IDS).long()).logits.numpy()


def _numpy_state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.cache
def _case(name):
  """Case `name`'s HF model, its state dict, our kwargs, variables and jitted forward (built once)."""
  conv = CASES[name][0].CONVERTER
  model = _hf_model(name, seed=0)
  state = _numpy_state(model)
  kwargs = conv.infer_config(state, model.config.to_dict())
  return types.SimpleNamespace(
      name=name, conv=conv, model=model, state=state, kwargs=kwargs,
      variables=conv.to_variables(state, kwargs), apply=jax.jit(models.build("lm", **kwargs).apply),
      logits=_hf_logits(model))


@pytest.fixture(params=list(CASES))
def case(request):
  return _case(request.param)


def _tied(case):
  return case.model.config.tie_word_embeddings


def _save_pretrained(tmp_path, tensors, config):
  """A model directory as HF writes one: our safetensors and HF's config.json."""
  safetensors_torch.save_file({k: torch.tensor(v) for k, v in tensors.items()},
                              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  config.save_pretrained(tmp_path)
  return tmp_path


def _load_pretrained(case, directory):
  model, info = type(case.model).from_pretrained(directory, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


def test_infer_config_reads_shapes_and_config(case):
  cfg = case.model.config
  if case.conv is gpt2.CONVERTER:
    expected = dict(embed_dim=cfg.n_embd, depth=cfg.n_layer, num_heads=cfg.n_head, max_len=cfg.n_positions,
                    norm_epsilon=cfg.layer_norm_epsilon, mlp_dim=cfg.n_inner or 4 * cfg.n_embd)
  else:
    expected = dict(embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                    num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, norm_epsilon=cfg.rms_norm_eps,
                    rope_base=cfg.rope_parameters["rope_theta"], mlp_dim=cfg.intermediate_size,
                    use_bias=cfg.attention_bias)
  assert {k: case.kwargs[k] for k in expected} == expected
  assert case.kwargs["tie_embeddings"] == _tied(case)


def test_logits_match_transformers(case):
  ours = np.asarray(case.apply(case.variables, IDS))
  assert ours.shape == case.logits.shape == (*IDS.shape, 256)
  np.testing.assert_allclose(ours, case.logits, rtol=0, atol=1e-4)


def test_expected_shapes_are_the_hf_state_dict(case):
  hf = {k: tuple(v.shape) for k, v in case.state.items()}
  if _tied(case):
    del hf["lm_head.weight"]  # the embedding, written once
  assert case.conv.expected_shapes(case.kwargs) == hf


def test_round_trip_is_bit_exact(case):
  back = case.conv.from_variables(case.variables, case.kwargs)
  assert set(back) == set(case.conv.expected_shapes(case.kwargs))
  for name, tensor in back.items():
    assert tensor.dtype == case.state[name].dtype and tensor.flags.c_contiguous, name
    np.testing.assert_array_equal(tensor, case.state[name], err_msg=name)
  again = case.conv.to_variables(back, case.kwargs)
  jax.tree.map(np.testing.assert_array_equal, again, case.variables)


def test_written_back_loads_in_transformers(case, tmp_path):
  back = case.conv.from_variables(case.variables, case.kwargs)
  model = _load_pretrained(case, _save_pretrained(tmp_path, back, case.model.config))
  np.testing.assert_array_equal(_hf_logits(model), case.logits)
  if not _tied(case):  # every parameter is in the file: a strict load needs nothing else
    fresh = type(case.model)(case.model.config).eval()
    fresh.load_state_dict({k: torch.tensor(v) for k, v in back.items()}, strict=True)
    np.testing.assert_array_equal(_hf_logits(fresh), case.logits)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_merged_model_loads_in_transformers(name, tmp_path):
  """GPT-2: the average of two models; Llama: task arithmetic of two fine-tunes of one base.

  The merge is mergejax's on the converted variables; written back, HF's
  logits are the zoo's logits of the merged variables.
  """
  case = _case(name)
  others = [_hf_model(name, seed) for seed in (1, 2)]
  variables = [case.variables] + [case.conv.to_variables(_numpy_state(m), case.kwargs) for m in others]
  if name == "gpt2":
    merged = mj.merge.average(variables[:2])
  else:  # the base is model 0; the "fine-tunes" are it plus a tenth of models 1 and 2
    tuned = [jax.tree.map(lambda b, v: b + 0.1 * v, variables[0], v) for v in variables[1:]]
    merged = mj.merge.task_arithmetic(variables[0], tuned, scale=0.5)
  ours = np.asarray(case.apply(merged, IDS))
  back = case.conv.from_variables(merged, case.kwargs)
  logits = _hf_logits(_load_pretrained(case, _save_pretrained(tmp_path, back, case.model.config)))
  np.testing.assert_allclose(logits, ours, rtol=0, atol=1e-4)
  # Not vacuous: the merge differs from each of its inputs.
  assert all(np.abs(logits - other).max() > 1e-2 for other in (case.logits, _hf_logits(others[0])))


def test_base_model_names_and_buffers_are_read(case):
  """GPT2Model / LlamaModel names (no prefix) and old checkpoints' buffers give the same variables."""
  prefix = gpt2.PREFIX if case.conv is gpt2.CONVERTER else llama.PREFIX
  state = {k.removeprefix(prefix): v for k, v in case.state.items()
           if not (_tied(case) and k == "lm_head.weight")}
  if case.conv is gpt2.CONVERTER:
    positions = case.kwargs["max_len"]
    state |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, positions, positions), bool)) for i in range(2)}
    state |= {f"h.{i}.attn.masked_bias": np.array(-1e4, np.float32) for i in range(2)}
  else:
    state |= {f"layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32) for i in range(2)}
  jax.tree.map(np.testing.assert_array_equal, case.conv.to_variables(state, case.kwargs), case.variables)
  assert case.conv.infer_config(state, case.model.config.to_dict()) == case.kwargs


@pytest.mark.parametrize("name", ["gpt2", "llama_tied"])
def test_tied_head_copy_is_ignored(name):
  """A tied model's lm_head.weight (HF's state_dict() lists it) is read as the embedding."""
  case = _case(name)
  state = dict(case.state, **{"lm_head.weight": np.zeros_like(case.state["lm_head.weight"])})
  jax.tree.map(np.testing.assert_array_equal, case.conv.to_variables(state, case.kwargs), case.variables)


class _Unread:
  """A tensor of known shape whose values must not be read (a lazy state dict's entry)."""

  def __init__(self, shape):
    self.shape = shape

  def __array__(self, *args, **kwargs):
    raise AssertionError("a tensor was read before the keys were checked")


@pytest.mark.parametrize("name,key", [("gpt2", "transformer.h.1.attn.c_attn.weight"),
                                      ("llama", "model.layers.1.self_attn.k_proj.weight"),
                                      ("llama", "lm_head.weight")])
def test_wrong_state_raises_naming_the_key_before_reading(name, key):
  conv = CASES[name][0].CONVERTER
  model = _hf_model(name, seed=0)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

  def unread(shapes):
    return {k: _Unread(s) for k, s in shapes.items()}

  kwargs = conv.infer_config(unread(shapes), model.config.to_dict())
  missing = {k: s for k, s in shapes.items() if k != key}
  with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
    conv.to_variables(unread(missing), kwargs)
  extra = dict(shapes, **{f"{key}.extra": (3,)})
  with pytest.raises(ValueError, match=rf"unexpected keys \['{key}.extra'\]"):
    conv.to_variables(unread(extra), kwargs)
  wrong = dict(shapes, **{key: (shapes[key][0] + 1, *shapes[key][1:])})
  with pytest.raises(ValueError, match=rf"{key}: \({wrong[key][0]}, .*expected \({shapes[key][0]},"):
    conv.to_variables(unread(wrong), kwargs)


def test_wrong_variables_raise_naming_the_path(case):
  params = case.variables["params"]
  missing = {"params": {k: v for k, v in params.items() if k != "ln_final"}}
  with pytest.raises(ValueError, match=r"missing leaves \[.*'params/ln_final/scale'\]"):
    case.conv.from_variables(missing, case.kwargs)
  extra = {"params": dict(params, extra={"kernel": np.zeros(2)})}
  with pytest.raises(ValueError, match=r"unexpected leaves \['params/extra/kernel'\]"):
    case.conv.from_variables(extra, case.kwargs)
  block = dict(params["block1"], mlp_down=dict(params["block1"]["mlp_down"], kernel=np.zeros((3, 3))))
  with pytest.raises(ValueError, match=r"params/block1/mlp_down/kernel: \(3, 3\), expected"):
    case.conv.from_variables({"params": dict(params, block1=block)}, case.kwargs)


def test_scan_variables_round_trip():
  case = _case("llama")
  kwargs = dict(case.kwargs, scan=True)
  stacked = case.conv.to_variables(case.state, kwargs)
  jax.tree.map(np.testing.assert_array_equal, stacked, lm.stack_layers(case.variables))
  back = case.conv.from_variables(stacked, kwargs)
  for name, tensor in back.items():
    np.testing.assert_array_equal(tensor, case.state[name], err_msg=name)


def test_bfloat16_is_kept(case):
  state = {k: v.astype(ml_dtypes.bfloat16) for k, v in case.state.items()}
  variables = case.conv.to_variables(state, case.kwargs)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype(ml_dtypes.bfloat16)}
  back = case.conv.from_variables(variables, case.kwargs)
  for name, tensor in back.items():
    assert tensor.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(tensor.view(np.uint16), state[name].view(np.uint16), err_msg=name)


@pytest.mark.parametrize("changes,message", [
    (dict(activation_function="relu"), r"gpt2 config: activation_function='relu' is not supported"),
    (dict(scale_attn_by_inverse_layer_idx=True), r"scale_attn_by_inverse_layer_idx=True is not supported"),
    (dict(n_layer=3), r"n_layer=3 but the tensors say 2"),
    (dict(n_head=5), r"n_head=5 must be a positive int dividing n_embd=32"),
    (None, r"gpt2: the number of heads is not in the tensor shapes"),
])
def test_gpt2_config_errors(changes, message):
  case = _case("gpt2")
  config = None if changes is None else dict(case.model.config.to_dict(), **changes)
  with pytest.raises(ValueError, match=message):
    gpt2.CONVERTER.infer_config(case.state, config)


def test_layers_not_numbered_from_zero_are_refused():
  case = _case("gpt2")
  state = {k.replace("transformer.h.1.", "transformer.h.2."): v for k, v in case.state.items()}
  with pytest.raises(ValueError, match=r"gpt2: layers \[0, 2\] are not numbered 0..L-1"):
    gpt2.CONVERTER.infer_config(state, case.model.config.to_dict())


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_act="gelu"), r"llama config: hidden_act='gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
     r"RoPE type 'linear' is not supported"),
    (dict(mlp_bias=True), r"attention_bias=False with mlp_bias=True is not supported"),
    (dict(num_key_value_heads=4), r"do not fit q_proj's 32 and k_proj's 16 rows"),
    (dict(hidden_size=64), r"hidden_size=64 but the tensors say 32"),
    (None, r"llama: the numbers of heads are not in the tensor shapes"),
])
def test_llama_config_errors(changes, message):
  case = _case("llama")
  config = None if changes is None else dict(case.model.config.to_dict(), **changes)
  with pytest.raises(ValueError, match=message):
    llama.CONVERTER.infer_config(case.state, config)


def test_llama_transformers4_config():
  """A transformers 4 config.json: `rope_theta` at the top, `rope_scaling` null."""
  case = _case("llama")
  config = {k: v for k, v in case.model.config.to_dict().items() if k != "rope_parameters"}
  v4 = dict(config, rope_theta=500.0, rope_scaling=None)
  assert llama.CONVERTER.infer_config(case.state, v4) == case.kwargs
  with pytest.raises(ValueError, match=r"RoPE type 'llama3' is not supported"):
    llama.CONVERTER.infer_config(case.state, dict(v4, rope_scaling={"rope_type": "llama3", "factor": 8.0}))


@pytest.mark.parametrize("conv,kwargs,message", [
    (gpt2, dict(style="gpt2", positions="rope"), r"gpt2: HF GPT-2 has positions='learned'"),
    (gpt2, dict(style="gpt2", num_kv_heads=2), r"gpt2: HF GPT-2 has no grouped-query attention"),
    (gpt2, dict(style="gpt2", num_heads=(4, 2)), r"one n_head and n_inner for all layers"),
    (gpt2, dict(style="gpt2", head_dim=8), r"num_heads \* head_dim == embed_dim"),
    (llama, dict(style="llama", fused_qkv=True), r"llama: HF Llama has fused_qkv=False"),
    (llama, dict(style="llama", mlp_dim=(48, 40)), r"one head count, kv head count and intermediate_size"),
    (gpt2, dict(style="gpt2", moe=dict(num_experts=4, top_k=2)), r"gpt2: HF GPT-2 has moe=None"),
    (llama, dict(style="llama", moe=dict(num_experts=4, top_k=2)), r"llama: HF Llama has moe=None"),
])
def test_zoo_configs_the_family_cannot_hold(conv, kwargs, message):
  with pytest.raises(ValueError, match=message):
    conv.CONVERTER.expected_shapes(kwargs)
  with pytest.raises(ValueError, match=message):
    conv.CONVERTER.from_variables({}, kwargs)


def test_registered():
  assert mj.io.convert.CONVERTERS["gpt2"] is gpt2.CONVERTER
  assert mj.io.convert.CONVERTERS["llama"] is llama.CONVERTER
  assert gpt2.CONVERTER.zoo_name == llama.CONVERTER.zoo_name == "lm"


def test_merge_checkpoints_program_merges_hf_files_that_transformers_loads(tmp_path):
  """experiments/merge_checkpoints.py end to end: two HF GPT-2 directories in, one out."""
  from experiments import merge_checkpoints

  case = _case("gpt2")
  other = _hf_model("gpt2", seed=3)
  for name in ("a", "b", "merged"):
    (tmp_path / name).mkdir()
  dirs = [_save_pretrained(tmp_path / name, _numpy_state(m), case.model.config)
          for name, m in (("a", case.model), ("b", other))]
  out = tmp_path / "merged"
  merge_checkpoints.run(method="average", models=[str(d / "model.safetensors") for d in dirs],
                        output=str(out / "model.safetensors"), family="gpt2",
                        family_config=str(dirs[0] / "config.json"))
  case.model.config.save_pretrained(out)
  merged = mj.merge.average([case.variables, case.conv.to_variables(_numpy_state(other), case.kwargs)])
  logits = _hf_logits(_load_pretrained(case, out))
  np.testing.assert_allclose(logits, np.asarray(case.apply(merged, IDS)), rtol=0, atol=1e-4)
  assert np.abs(logits - case.logits).max() > 1e-2
