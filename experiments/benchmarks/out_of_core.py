r"""Out-of-core merging: peak memory of merge_checkpoints against loading every model.

    python -m experiments.benchmarks.out_of_core --sizes=2,4,8 --leaves=50 \
        --leaf_size=2000000

Writes a base model and max(--sizes) fine-tuned models (base plus small noise)
of --leaves float32 leaves of --leaf_size entries each as orbax checkpoints in
a temporary directory, one model in memory at a time. Then, for each method
and N, each in a fresh subprocess, it merges the first N models two ways: with
`mj.io.merge_checkpoints` (leaf by leaf), and the baseline, which restores
every model with `mj.io.restore`, merges in memory with `mj.merge` and saves
the result with `mj.io.save`. It prints each subprocess's peak resident
memory (VmHWM) and the merge's time, with a subprocess that only imports
mergejax as the floor. The checkpoints are deleted at the end.
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

import mergejax as mj

_SIZES = flags.DEFINE_list("sizes", ["2", "4", "8"], "Numbers of models N to merge.")
_METHODS = flags.DEFINE_list("methods", ["average", "ties"], "Methods of mj.io.merge_checkpoints.")
_LEAVES = flags.DEFINE_integer("leaves", 50, "Leaves per model.")
_LEAF_SIZE = flags.DEFINE_integer("leaf_size", 2_000_000, "float32 entries per leaf.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the checkpoints (default: a temp dir).")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one measurement (JSON spec) and exit.")

_BASE_SEED = 10_000


def _model(seed: int, base_seed: int | None, leaves: int, leaf_size: int) -> dict:
  """{"params": {"layer_j": {"kernel": f32[leaf_size]}}}: normal, or base + 0.01 normal."""
  tree = {}
  for j in range(leaves):
    leaf = np.random.default_rng((seed, j)).standard_normal(leaf_size, np.float32)
    if base_seed is not None:
      base = np.random.default_rng((base_seed, j)).standard_normal(leaf_size, np.float32)
      leaf = base + np.float32(0.01) * leaf
    tree[f"layer_{j:03d}"] = {"kernel": leaf}
  return {"params": tree}


def _write_models(root: pathlib.Path, num: int) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """The base and `num` fine-tuned checkpoints, written one model at a time."""
  leaves, size = _LEAVES.value, _LEAF_SIZE.value
  base = mj.io.save(root / "base", _model(_BASE_SEED, None, leaves, size))
  models = [
      mj.io.save(root / f"model_{i}", _model(i, _BASE_SEED, leaves, size)) for i in range(num)
  ]
  return base, models


def _peak_resident_mb() -> float:
  """This process's peak resident memory (VmHWM) in MB.

  Not `ru_maxrss`: Linux carries a child's `ru_maxrss` over from the parent
  it was forked from (across exec), so a child of a large parent would report
  at least the parent's size. VmHWM belongs to the child's own address space.
  """
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024  # kB
  raise RuntimeError("no VmHWM in /proc/self/status")


def _run_child(spec: dict) -> None:
  """One measurement in this process (a merge, or nothing beyond the imports);
  prints its peak resident MB and the merge's seconds as JSON."""
  start = time.perf_counter()
  mode, method = spec["mode"], spec.get("method")
  base_path = None if method == "average" else spec.get("base")
  if mode == "out_of_core":
    mj.io.merge_checkpoints(method, spec["models"], spec["out"], base_path=base_path)
  elif mode == "in_memory":
    models = [mj.io.restore(p) for p in spec["models"]]
    if method == "average":
      merged = mj.merge.average(models)
    else:
      merged = getattr(mj.merge, method)(mj.io.restore(base_path), models)
    mj.io.save(spec["out"], merged)
  print(json.dumps({"peak_mb": _peak_resident_mb(), "seconds": time.perf_counter() - start}))


def _measure(spec: dict) -> tuple[float, float]:
  """(peak resident MB, seconds) of `spec` run in a fresh subprocess."""
  command = [sys.executable, "-m", "experiments.benchmarks.out_of_core", f"--child={json.dumps(spec)}"]
  child = subprocess.run(command, capture_output=True, text=True, check=False)
  if child.returncode != 0:
    raise RuntimeError(f"measurement {spec} failed:\n{child.stderr[-3000:]}")
  if "out" in spec:
    shutil.rmtree(spec["out"], ignore_errors=True)
  result = json.loads(child.stdout.strip().splitlines()[-1])
  return result["peak_mb"], result["seconds"]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore
  if _CHILD.value:
    _run_child(json.loads(_CHILD.value))
    return
  sizes = [int(n) for n in _SIZES.value]
  root = pathlib.Path(tempfile.mkdtemp(prefix="ooc_bench_", dir=_WORKDIR.value))
  try:
    start = time.perf_counter()
    base, models = _write_models(root, max(sizes))
    model_mb = _LEAVES.value * _LEAF_SIZE.value * 4 / 2**20
    print(f"{len(models) + 1} checkpoints of {_LEAVES.value} x {_LEAF_SIZE.value} float32"
          f" ({model_mb:.0f} MB each) written in {time.perf_counter() - start:.0f} s", flush=True)
    floor, _ = _measure({"mode": "imports"})
    print(f"floor (a subprocess that imports mergejax): {floor:.0f} MB", flush=True)
    print(f"{'method':8s} {'N':>3s} {'ooc MB':>8s} {'load-all MB':>12s} {'ooc/all':>8s}"
          f" {'ooc s':>7s} {'load-all s':>11s}")
    for method in _METHODS.value:
      for n in sizes:
        spec = {"method": method, "models": [str(p) for p in models[:n]], "base": str(base),
                "out": str(root / "merged")}
        ooc_mb, ooc_s = _measure({**spec, "mode": "out_of_core"})
        all_mb, all_s = _measure({**spec, "mode": "in_memory"})
        print(f"{method:8s} {n:3d} {ooc_mb:8.0f} {all_mb:12.0f} {ooc_mb / all_mb:8.2f}"
              f" {ooc_s:7.1f} {all_s:11.1f}", flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
