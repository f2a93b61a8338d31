"""Data passes over 2 processes x 4 CPU devices (experiments/launch_local.py).

One launch runs every case (`run_cases`, in the launched processes): each
process passes its own shard of the data, and the test (one process, 8
devices) checks that both processes got the same result, bit for bit, and
that it equals one process's over all the data in the same order. Without
the processes agreeing, each returned its own shard's statistics (the
`local_mesh` case keeps that behaviour, asked for by a mesh of one process's
devices), uneven shards built different global shapes per process, and a
process with fewer batches left the other waiting.

Checkpoints: the processes save variables sharded over all 8 devices, restore
them, and merge two such checkpoints; the test process restores them in its
own topology (orbax's own restore failed there: "Topology mismatch").
"""

import pathlib
import subprocess
import sys
import time

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from experiments import launch_local
import mergejax as mj
from mergejax import distributed
from mergejax import stats

PROCESSES, DEVICES = 2, 4
KEY = 7  # the "sampled" Fisher's key


def _mlp(v, x):
  h = jnp.tanh(x @ v["params"]["l1"]["kernel"] + v["params"]["l1"]["bias"])
  return h @ v["params"]["head"]["kernel"] + v["params"]["head"]["bias"]


def _hidden(v, x):
  return [jnp.tanh(x @ v["params"]["l1"]["kernel"] + v["params"]["l1"]["bias"])]


def _variables(seed):
  rng = np.random.default_rng(seed)
  dense = lambda i, o: {"kernel": (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32),
                        "bias": 0.1 * rng.standard_normal(o).astype(np.float32)}
  return {"params": {"l1": dense(4, 6), "head": dense(6, 3)}}


def _x():
  return np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)


# Each case: (rows of process 0's batches, rows of process 1's batches).
SHARDS = {
    "even": ([(0, 8), (16, 24)], [(8, 16), (24, 32)]),
    "uneven_rows": ([(0, 4)], [(4, 12)]),
    "uneven_batches": ([(0, 8), (16, 24)], [(8, 16)]),
}


def _shard(case, process):
  x = _x()
  return [x[a:b] for a, b in SHARDS[case][process]]


def _all_data(case, devices_in_mesh_order=None):
  """One process's batches over all the data: step k is every process's k-th batch.

  In the order the mesh's devices hold the rows, given as (process, local
  device) pairs (default: process by process), each device holding an equal
  part of its process's batch; the "sampled" Fisher numbers examples in it.
  """
  parts = [_shard(case, p) for p in range(PROCESSES)]
  order = devices_in_mesh_order or [(p, d) for p in range(PROCESSES) for d in range(DEVICES)]
  per_device = max(-(-len(part[0]) // DEVICES) for part in parts)  # as accumulate pads
  steps = []
  for k in range(max(len(p) for p in parts)):
    steps.append(np.concatenate([parts[p][k][d * per_device:(d + 1) * per_device]
                                 for p, d in order if k < len(parts[p])]))
  return steps


_STATS = {}


def _stat(name):
  """One Accumulator per name, so every case reuses its compiled update."""
  if name not in _STATS:
    _STATS[name] = {
        "gram": lambda: stats.gram(_hidden, chunk=3),
        "cross_moments": lambda: stats.cross_moments(_hidden),
        "fisher": lambda: mj.fisher_accumulator(_mlp, kind="sampled", key=jax.random.key(KEY)),
    }[name]()
  return _STATS[name]


def _variables_of(name):
  va, vb = _variables(1), _variables(2)
  return {"gram": (va, vb), "cross_moments": (va, vb), "fisher": va}[name]


def _pass(name, batches, mesh=None):
  return jax.tree.leaves(stats.accumulate(_stat(name), _variables_of(name), batches, mesh=mesh, progress=False))


def _meshes():
  devices = np.array(jax.devices())
  return {
      # processes along "data", 2 devices of each on "model"
      "mesh_2d": jax.sharding.Mesh(devices.reshape(4, 2), ("data", "model")),
      # "model" across the processes: each process's rows are not contiguous
      "mesh_2d_model_across": jax.sharding.Mesh(devices.reshape(2, 4).T, ("data", "model")),
  }


def _matched(batches):
  va, vb = _variables(1), _variables(2)
  spec = mj.permutation_spec(_mlp, va, _x()[:1])
  matched = mj.activation_matching(spec, _mlp, va, vb, batches, progress=False)
  return [*jax.tree.leaves(matched.perm), *jax.tree.leaves(matched.pair_scores)]


def _ste(batches):
  va, vb = _variables(1), _variables(2)
  spec = mj.permutation_spec(_mlp, va, _x()[:1])

  def loss_fn(v, batch):  # a mean over the batch's rows
    x, y = batch
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(_mlp(v, x)), y[:, None], axis=1))

  matched = mj.ste_matching(spec, loss_fn, va, vb, batches, num_steps=3, optimizer=optax.sgd(0.5))
  return [*jax.tree.leaves(matched.perm), matched.objective_trace]


def _labelled(rows):
  """(x, y) batches of the given row ranges; y in [0, 3)."""
  x, y = _x(), np.random.default_rng(1).integers(0, 3, 32).astype(np.int32)
  return [(x[a:b], y[a:b]) for a, b in rows]


STE_ROWS = ([(0, 8)], [(8, 12)])  # uneven: every step's gradient weighs process 0's 8 rows and process 1's 4


def _concatenated(parts):
  return tuple(np.concatenate(columns) for columns in zip(*parts))


def _sharded_permutation():
  """A leaf split by rows over all 8 devices of both processes, permuted along those rows."""
  mesh = distributed.default_mesh()
  x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
  sharding = jax.sharding.NamedSharding(mesh, P("data"))
  leaf = jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
  spec = mj.PermutationSpec({"h": [mj.AxisRef(("w",), 0)]}, {"h": 64})
  got = mj.apply_permutation(spec, {"h": np.random.default_rng(9).permutation(64).astype(np.int32)}, {"w": leaf})["w"]
  return [np.array(int(got.sharding == sharding)), multihost_utils.process_allgather(got, tiled=True)]


def _grams(batches):
  return jax.tree.leaves(mj.merge.regmean_grams(_mlp, _variables(1), batches))


def _pleas(batches):
  va, vb = _variables(1), _variables(2)
  merged, _ = mj.merge.pleas(_mlp, va, vb, lambda: iter(batches), budget=1.5, matching="activation",
                             progress=False)
  return jax.tree.leaves(merged)


def _zipit(batches):
  merged, _, _ = mj.merge.zipit(_mlp, _variables(1), _variables(2), lambda: iter(batches), budget=1.5,
                                progress=False)
  return jax.tree.leaves(merged)


def _regmean_plus_plus(batches):
  return jax.tree.leaves(mj.merge.regmean_plus_plus(_mlp, [_variables(1), _variables(2)], [batches, batches]))


def _error(fn):
  return _error_of(ValueError, fn)


def _error_of(kind, fn):
  try:
    fn()
  except kind as e:
    return str(e)
  return "no error"


def _checkpoint_values():
  rng = np.random.default_rng(3)
  return {"params": {"w": rng.standard_normal((8, 6)).astype(np.float32),
                     "b": rng.standard_normal(6).astype(np.float32),
                     "table": np.arange(16, dtype=np.float32)}}


def _other_checkpoint_values():
  return jax.tree.map(lambda v: 2 * v + 1, _checkpoint_values())


def _checkpoint_shardings(mesh):
  specs = {"params": {"w": P("data", "model"), "b": P(), "table": P(("data", "model"))}}
  return jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), specs)


def _checkpoint_mesh():
  """All 8 devices, 4 x 2: "data" across the processes."""
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def _global_arrays(values, shardings):
  return jax.tree.map(lambda v, s: jax.make_array_from_callback(v.shape, s, lambda i: v[i]), values, shardings)


def checkpoint_cases(outdir):
  """Saves sharded variables from every process, restores them; the checks' inputs as {name: array}."""
  out = {}
  values = _checkpoint_values()
  shardings = _checkpoint_shardings(_checkpoint_mesh())
  path = pathlib.Path(outdir) / "checkpoint"
  mj.io.save(path, _global_arrays(jax.tree.map(np.negative, values), shardings))
  out["error/checkpoint_exists"] = np.array(_error_of(FileExistsError, lambda: mj.io.save(path, values)))
  mj.io.save(path, _global_arrays(values, shardings), overwrite=True, metadata={"by": jax.process_count()})
  restored = mj.io.restore(path, like=_global_arrays(values, shardings))
  kept = jax.tree.map(lambda r, s: r.sharding == s, restored, shardings)
  out["checkpoint/same_sharding"] = np.array(all(jax.tree.leaves(kept)))
  for i, leaf in enumerate(jax.tree.leaves(restored)):
    out[f"checkpoint/restored/{i}"] = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  whole = mj.io.restore(path)  # the default: each process's first device, whole
  out["checkpoint/default_on_own_device"] = np.array(
      all(leaf.devices() == {jax.local_devices()[0]} for leaf in jax.tree.leaves(whole)))
  for i, leaf in enumerate(jax.tree.leaves(whole)):
    out[f"checkpoint/restored_whole/{i}"] = np.asarray(leaf)
  other = pathlib.Path(outdir) / "other_checkpoint"
  mj.io.save(other, _global_arrays(_other_checkpoint_values(), shardings))
  merge = lambda out_path, **kw: mj.io.merge_checkpoints("average", [path, other], out_path, **kw)
  merge(pathlib.Path(outdir) / "merged")
  out["error/merge_to_safetensors"] = np.array(
      _error(lambda: merge(pathlib.Path(outdir) / "merged.safetensors", output_format="safetensors")))
  return out


def run_cases(outdir):
  """In each launched process: every case, results to `<outdir>/<process>.npz`."""
  me = jax.process_index()
  out, seconds = {}, {}

  def record(case, leaves_fn):
    start = time.perf_counter()
    out.update({f"{case}/{i}": np.asarray(leaf) for i, leaf in enumerate(leaves_fn())})
    seconds[case] = round(time.perf_counter() - start, 2)

  for case in SHARDS:
    for name in ("gram", "cross_moments", "fisher"):
      record(f"{case}/{name}", lambda: _pass(name, _shard(case, me)))
  for (case, mesh), name in zip(_meshes().items(), ("gram", "fisher")):
    record(f"{case}/{name}", lambda: _pass(name, _shard("even", me), mesh))
  local = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
  record("local_mesh/gram", lambda: _pass("gram", _shard("even", me), local))
  record("activation_matching", lambda: _matched(_shard("even", me)))
  record("ste_matching", lambda: _ste(_labelled(STE_ROWS[me])))
  # process 0 has no batch: it passes masked ones, every process gets process 1's statistic
  record("no_batches/gram", lambda: _pass("gram", [] if me == 0 else _shard("even", me)))
  record("no_batches/fisher", lambda: jax.tree.leaves(mj.fisher(
      _mlp, _variables(1), [] if me == 0 else _shard("even", me), kind="sampled", key=jax.random.key(KEY),
      progress=False)))
  record("no_batches/activation_matching", lambda: _matched([] if me == 0 else _shard("even", me)))
  record("no_batches/regmean_grams", lambda: _grams([] if me == 0 else _shard("even", me)))
  for name, merge in (("pleas", _pleas), ("zipit", _zipit), ("regmean_plus_plus", _regmean_plus_plus)):
    record(f"no_batches/{name}", lambda: merge([] if me == 0 else _shard("even", me)))
  # every process enumerates the same 4 batches and keeps its share: process p gets batches p and p + 2
  every = [_x()[i:i + 8] for i in range(0, 32, 8)]
  record("process_shard/list", lambda: _pass("gram", distributed.process_shard(every)))
  record("process_shard/callable", lambda: _pass("gram", distributed.process_shard(lambda: iter(every))))
  record("process_shard/iterator", lambda: _pass("gram", distributed.process_shard(iter(every))))
  record("sharded_permutation", _sharded_permutation)
  record("pleas", lambda: _pleas(_shard("even", me)))
  errors = {
      # process 1's second batch is larger than its first
      "larger_batch": lambda: _pass("gram", _shard("even", me) if me == 0 else [_x()[:4], _x()[:8]]),
      "empty_everywhere": lambda: _pass("gram", []),
      "ste_empty": lambda: _ste([] if me == 0 else _labelled(STE_ROWS[me])),
      "other_variables": lambda: stats.accumulate(_stat("gram"), (_variables(1), _variables(me + 2)),
                                                  _shard("even", me), progress=False),
      "fisher_labels": lambda: mj.fisher(_mlp, _variables(1), [(_x()[:8], np.full(8, 5 * me, np.int32))],
                                         kind="empirical", progress=False),
  }
  for name, fn in errors.items():
    out[f"error/{name}"] = np.array(_error(fn))
  start = time.perf_counter()
  out.update(checkpoint_cases(outdir))
  seconds["checkpoint"] = round(time.perf_counter() - start, 2)
  print("seconds per case:", seconds, flush=True)
  np.savez(pathlib.Path(outdir) / f"{me}.npz", **out)


@pytest.fixture(scope="session")
def outdir(tmp_path_factory):
  return tmp_path_factory.mktemp("multiprocess")


@pytest.fixture(scope="session")
def results(outdir):
  finished = launch_local.launch("tests.test_multiprocess:run_cases", [str(outdir)], processes=PROCESSES,
                                 devices_per_process=DEVICES, timeout_s=240)
  assert all(f.returncode == 0 for f in finished), launch_local.describe(finished)
  return [dict(np.load(outdir / f"{p}.npz")) for p in range(PROCESSES)]


def _leaves(results, case):
  per_process = []
  for r in results:
    keys = sorted((k for k in r if k.startswith(case + "/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    per_process.append([r[k] for k in keys])
  return per_process


def _check(results, case, want, rtol=1e-5, atol=1e-6):
  first, second = _leaves(results, case)
  assert len(first) == len(want) > 0, case
  for a, b, w in zip(first, second, want):
    np.testing.assert_array_equal(a, b, err_msg=f"{case}: the processes differ")
    np.testing.assert_allclose(a, w, rtol=rtol, atol=atol, err_msg=case)


@pytest.mark.parametrize("case", list(SHARDS))
@pytest.mark.parametrize("name", ["gram", "cross_moments", "fisher"])
def test_statistics_of_all_processes_data(results, case, name):
  _check(results, f"{case}/{name}", _pass(name, _all_data(case)))


def test_a_users_2d_mesh(results):
  _check(results, "mesh_2d/gram", _pass("gram", _all_data("even")))
  # "model" across the processes: the global batch interleaves their devices' rows
  interleaved = [(p, d) for d in range(DEVICES) for p in range(PROCESSES)]
  _check(results, "mesh_2d_model_across/fisher", _pass("fisher", _all_data("even", interleaved)))


def test_a_mesh_of_one_process_gives_that_process_statistics(results):
  for p, r in enumerate(results):
    own = _pass("gram", _shard("even", p))
    got = [r[f"local_mesh/gram/{i}"] for i in range(len(own))]
    assert int(got[0]) == 16  # its own half of 32 rows
    for g, w in zip(got, own):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_activation_matching_and_pleas_as_one_process(results):
  _check(results, "activation_matching", _matched(_all_data("even")))
  _check(results, "pleas", _pleas(_all_data("even")), rtol=1e-4, atol=1e-5)


def test_straight_through_matching_as_one_process(results):
  """Each step's gradient is the row-weighted mean of the processes': one
  process's on each step's batches concatenated (8 + 4 rows)."""
  both = [_concatenated(_labelled(rows)[0] for rows in STE_ROWS)]
  _check(results, "ste_matching", _ste(both), rtol=1e-5, atol=1e-6)


def test_a_process_with_no_batches_contributes_none(results):
  own = _shard("even", 1)
  _check(results, "no_batches/gram", _pass("gram", own))
  want = jax.tree.leaves(mj.fisher(_mlp, _variables(1), own, kind="sampled", key=jax.random.key(KEY),
                                   progress=False))
  _check(results, "no_batches/fisher", want)
  _check(results, "no_batches/activation_matching", _matched(own))
  _check(results, "no_batches/regmean_grams", _grams(own))
  _check(results, "no_batches/pleas", _pleas(own), rtol=1e-4, atol=1e-5)
  _check(results, "no_batches/zipit", _zipit(own), rtol=1e-4, atol=1e-5)
  _check(results, "no_batches/regmean_plus_plus", _regmean_plus_plus(own), rtol=1e-4, atol=1e-5)


def test_process_shard_gives_each_process_its_share_of_the_batches(results):
  for kind in ("list", "callable", "iterator"):  # step k: batches 2k (process 0) and 2k + 1 (process 1)
    _check(results, f"process_shard/{kind}", _pass("gram", _all_data("even")))


def test_permuting_an_axis_sharded_over_both_processes(results):
  x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
  _check(results, "sharded_permutation", [np.array(1), x[np.random.default_rng(9).permutation(64)]], atol=0)


def test_a_failure_on_one_process_raises_on_every_process(results):
  first, second = ({k[len("error/"):]: str(v) for k, v in r.items() if k.startswith("error/")} for r in results)
  assert "batches must be at most the first's" in second["larger_batch"]
  assert "process(es) [1] failed" in first["larger_batch"]
  for r in (first, second):
    assert "batches is empty on every process ([0, 1])" in r["empty_everywhere"]
    assert "variables differ between processes (process(es) [1]" in r["other_variables"]
  assert "ste_matching: batches is empty" in first["ste_empty"]
  assert "ste_matching: process(es) [0] failed" in second["ste_empty"]
  assert "labels must lie in [0, 3)" in second["fisher_labels"]
  assert "fisher: process(es) [1] failed" in first["fisher_labels"]


def test_every_process_saves_its_shards_and_restores_them(results, outdir):
  want = jax.tree.leaves(_checkpoint_values())
  for r in results:
    assert r["checkpoint/same_sharding"]
    assert r["checkpoint/default_on_own_device"]
    for kind in ("restored", "restored_whole"):
      for i, w in enumerate(want):
        np.testing.assert_array_equal(r[f"checkpoint/{kind}/{i}"], w, err_msg=f"{kind}/{i}")
    assert "exists; pass overwrite=True to replace it" in str(r["error/checkpoint_exists"])
    assert "safetensors output is written by one process" in str(r["error/merge_to_safetensors"])
  # one merged checkpoint, no scratch directory left, nothing written by the refused merge
  assert sorted(p.name for p in outdir.iterdir()) == ["0.npz", "1.npz", "checkpoint", "merged", "other_checkpoint"]


def test_a_checkpoint_of_two_processes_restores_in_one(results, outdir):
  path = outdir / "checkpoint"
  values = _checkpoint_values()
  assert mj.io.load_metadata(path)["by"] == PROCESSES
  shardings = _checkpoint_shardings(_checkpoint_mesh())  # this process's 8 devices, the same layout
  like = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values, shardings)
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)), P())
  restored = {
      "like": (mj.io.restore(path, like=like), shardings),
      "tree_of_shardings": (mj.io.restore(path, sharding=shardings), shardings),
      "one_sharding": (mj.io.restore(path, sharding=replicated), jax.tree.map(lambda _: replicated, values)),
      "default": (mj.io.restore(path), jax.tree.map(
          lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), values)),
  }
  for how, (got, want_shardings) in restored.items():
    assert jax.tree.structure(got) == jax.tree.structure(values), how
    for g, v, s in zip(jax.tree.leaves(got), jax.tree.leaves(values), jax.tree.leaves(want_shardings)):
      assert g.sharding == s, how
      np.testing.assert_array_equal(np.asarray(g), v, err_msg=how)


def test_a_merge_of_two_processes_is_the_merge_of_one(results, outdir, tmp_path):
  inputs = [outdir / "checkpoint", outdir / "other_checkpoint"]
  merged = mj.io.restore(outdir / "merged")
  one_process = mj.io.restore(mj.io.merge_checkpoints("average", inputs, tmp_path / "merged"))
  assert mj.io.load_metadata(outdir / "merged") == mj.io.load_metadata(tmp_path / "merged")
  want = jax.tree.map(lambda a, b: (a + b) / 2, _checkpoint_values(), _other_checkpoint_values())
  for got, same, w in zip(jax.tree.leaves(merged), jax.tree.leaves(one_process), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(same))
    np.testing.assert_allclose(np.asarray(got), w, rtol=1e-6)


def _started(*codes):
  return [subprocess.Popen([sys.executable, "-c", code]) for code in codes]


def test_the_launcher_ends_the_others_when_one_fails_or_time_runs_out():
  start = time.monotonic()
  running = _started("import time; time.sleep(60)", "raise SystemExit(3)")
  timed_out, killed = launch_local._wait(running, time.monotonic() + 60)
  assert (timed_out, killed, running[1].returncode) == (set(), {0}, 3)
  running = _started("import time; time.sleep(60)", "pass")
  timed_out, killed = launch_local._wait(running, time.monotonic() + 1)
  assert (timed_out, killed, running[1].returncode) == ({0}, set(), 0)
  assert running[0].returncode != 0
  assert time.monotonic() - start < 30
