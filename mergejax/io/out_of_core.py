"""Out-of-core merging: merge checkpoints one leaf at a time.

    mj.io.merge_checkpoints(
        "ties", ["/ckpt/a", "/ckpt/b"], "/ckpt/merged", base_path="/ckpt/base",
        density=0.2)
    merged = mj.io.restore("/ckpt/merged")

`merge_checkpoints` never holds N models in memory. For every leaf of the
variables tree it reads that leaf from each input checkpoint (an orbax partial
restore of one leaf, or one tensor of a lazily read state dict), applies the
in-memory method of `mergejax.merge` to the single-leaf trees, and writes the
merged leaf to the output (an orbax partial save of one leaf, or the next
tensor of a safetensors file). Each leaf keeps its real key path (it is
wrapped in dicts nested along it), so what depends on the path, like DARE's
random keys or a method's error message, is as in the in-memory merge, and so
is every result.

Inputs are orbax checkpoints (`mergejax.io.save`) or state dicts
(`state_dict.read_state_dict`: safetensors files, sharded safetensors
directories, torch files). A state dict's tensor name is the key path split
at its dots (`h.0.attn.weight` -> `h/0/attn/weight`), so an orbax checkpoint
of the nested tree and a safetensors file of the flat names merge alike, and
a safetensors output names each leaf by its key path joined with dots.

Global TIES trimming (`trim="global"`) needs each model's threshold, over all
of its leaves, before any leaf is merged: a first pass computes it, one model
at a time, from that model's task-vector magnitudes (k and DARE's rescale by
the merge's `convention`). FusionBench's zero-sign rule (a convention whose
`zero_sign` is "majority") needs the model's `ties_sign_balance`: a pass over
the leaves, after the thresholds', adds up each leaf's.

Peak memory is one leaf per input checkpoint, plus one model's magnitudes in
the global TIES pass, plus what JAX and orbax hold, whatever the number of
models. Each leaf compiles the method anew (its tree differs from the last
leaf's by the path), which costs about a second per leaf for DARE on a CPU.

The output is written with `orbax.checkpoint.experimental.v1.partial`
(orbax's API for saving a checkpoint in parts, then finalizing it) into a
hidden directory beside `out_path`, completed with the metadata item that
`restore` and `load_metadata` read, and renamed to `out_path` only when
complete. As safetensors (`output_format="safetensors"`), the header is
written first from the inputs' shapes and dtypes (merges keep both), then
each merged tensor as it is computed, into the same hidden directory. A
failure removes that directory: `out_path` holds the whole merge or what it
held before. Under several processes each computes every leaf alike, orbax
writes process 0's copy, and process 0 alone makes, renames and removes
the hidden directory (its name broadcast), between barriers.
"""

from collections.abc import Sequence
import functools
import inspect
import json
import math
import os
import pathlib
import secrets
import shutil
import tempfile
from typing import Any, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental.v1 import partial

from mergejax import merge
from mergejax import tree as mt
from mergejax.io import checkpoint
from mergejax.io import state_dict
from mergejax.merge import task_vectors

PyTree = Any
PathLike = str | os.PathLike[str]
KeyPath = tuple[jax.tree_util.DictKey, ...]

# Method -> what it reads beside the models: "models" nothing, "base" the
# pre-trained checkpoint (task vectors), "curvature" one checkpoint per model
# (`fisher_paths`: Fishers, or OTA's Adam second moments). Every method here
# merges each leaf on its own (given the global passes below).
METHODS = {
    "average": "models",
    "metric_weighted_average": "models",
    "task_arithmetic": "base",
    "ties": "base",
    "dare": "base",
    "dare_ties": "base",
    "consensus_task_arithmetic": "base",
    "consensus_ties": "base",
    "sce": "base",
    "pcb": "base",
    "widen": "base",
    "doge": "base",
    "fisher": "curvature",
    "ota": "curvature",
}
# Method -> (keyword, the value that makes it per leaf): settings that couple leaves are refused.
_PER_LEAF_SETTINGS = {"pcb": ("scope", "tensor")}
OUTPUT_FORMATS = ("orbax", "safetensors")


class _Inputs(NamedTuple):
  """The checkpoints a merge reads (absolute paths)."""

  models: list[pathlib.Path]
  base: pathlib.Path | None
  fishers: list[pathlib.Path] | None

  def paths(self) -> list[pathlib.Path]:
    return self.models + ([self.base] if self.base else []) + (self.fishers or [])


def _check_arguments(
    method: str,
    paths: Sequence[PathLike],
    base_path: PathLike | None,
    fisher_paths: Sequence[PathLike] | None,
) -> None:
  """Raises ValueError for an unknown method or inputs it does not take."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHODS)}")
  if not paths:
    raise ValueError("paths: merging needs at least one checkpoint")
  reads = METHODS[method]
  if reads == "base" and base_path is None:
    raise ValueError(f"{method} merges task vectors: pass base_path")
  if reads != "base" and base_path is not None:
    raise ValueError(f"{method} takes no base_path")
  if reads == "curvature":
    if fisher_paths is None or len(fisher_paths) != len(paths):
      given = 0 if fisher_paths is None else len(fisher_paths)
      raise ValueError(
          f"{method} needs one fisher_paths entry per model: {len(paths)} models,"
          f" {given} fisher_paths"
      )
  elif fisher_paths is not None:
    raise ValueError(f"{method} takes no fisher_paths")


def _check_per_leaf(method: str, kwargs: dict[str, Any]) -> None:
  """Raises ValueError for a setting under which `method` couples leaves (PCB's global scope)."""
  if method in _PER_LEAF_SETTINGS:
    name, value = _PER_LEAF_SETTINGS[method]
    if kwargs[name] != value:
      raise ValueError(f"{method} with {name}={kwargs[name]!r} couples every leaf; out of core it needs"
                       f" {name}={value!r}")


def _state(path: pathlib.Path) -> pathlib.Path:
  """The directory of a checkpoint's variables tree (an orbax PyTree item)."""
  return path / checkpoint._STATE  # pylint: disable=protected-access


def _as_tree(leaves: dict[KeyPath, Any]) -> dict[str, Any]:
  """The nested dicts that hold each value at its key path: `{k1: {k2: value}}`."""
  tree = {}
  for key_path, value in leaves.items():
    node = tree
    for key in key_path[:-1]:
      node = node.setdefault(key.key, {})
    node[key_path[-1].key] = value
  return tree


def _is_orbax(path: pathlib.Path) -> bool:
  """Whether `path` is laid out as a mergejax orbax checkpoint (a directory of state and metadata)."""
  return (path / checkpoint._METADATA).is_dir() and _state(path).is_dir()  # pylint: disable=protected-access


@functools.lru_cache(maxsize=64)
def _open_state_dict(path: pathlib.Path, stamp: tuple[int, int]) -> state_dict.StateDict:
  """The lazy state dict at `path`, its headers parsed once per version (`stamp`: mtime, size)."""
  del stamp  # part of the cache key only
  return state_dict.read_state_dict(path)


def _state_dict(path: pathlib.Path) -> state_dict.StateDict:
  info = path.stat()
  return _open_state_dict(path, (info.st_mtime_ns, info.st_size))


def tensor_key_path(name: str) -> KeyPath:
  """A state dict's tensor name as a key path: `"h.0.weight"` -> `(DictKey("h"), DictKey("0"), ...)`."""
  return tuple(jax.tree_util.DictKey(part) for part in name.split("."))


def tensor_name(key_path: KeyPath) -> str:
  """The inverse of `tensor_key_path`: the key names joined with dots."""
  return ".".join(mt.key_path(key_path))


def _state_dict_leaves(path: pathlib.Path) -> dict[KeyPath, jax.ShapeDtypeStruct]:
  """`{key path: shape and dtype}` of a state dict's tensors, names split at their dots."""
  state = _state_dict(path)
  names = set(state)
  for name in state:
    parts = name.split(".")
    if not all(parts):
      raise ValueError(f"{path}: tensor name {name!r} has an empty part between dots")
    prefix = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in names), None)
    if prefix is not None:
      raise ValueError(f"{path}: tensors {prefix!r} and {name!r} cannot both be leaves of one tree")
  return {tensor_key_path(n): jax.ShapeDtypeStruct(e.shape, e.dtype) for n, e in state.items()}


def _saved_leaves(path: pathlib.Path) -> dict[KeyPath, jax.ShapeDtypeStruct]:
  """`{key path: shape and dtype}` of a checkpoint's leaves, from its metadata or headers."""
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if not _is_orbax(path):
    return _state_dict_leaves(path)
  try:
    checkpoint.load_metadata(path)
    saved = ocp.PyTreeCheckpointHandler().metadata(_state(path)).tree
  except FileNotFoundError:
    raise  # names the path: not a mergejax checkpoint
  except (OSError, ValueError) as e:
    raise ValueError(f"checkpoint {path} is unreadable: {e}") from e
  leaves = {}
  for key_path, info in jax.tree_util.tree_flatten_with_path(saved)[0]:
    where = f"checkpoint {path}: {mt.path_str(key_path)}"
    if not all(isinstance(k, jax.tree_util.DictKey) for k in key_path):
      raise ValueError(f"{where}: only trees of nested dicts are merged out of core")
    if not isinstance(info, ocp.metadata.ArrayMetadata):
      raise ValueError(f"{where} is not an array")
    leaves[key_path] = jax.ShapeDtypeStruct(info.shape, info.dtype)
  return leaves


def _common_leaves(paths: Sequence[pathlib.Path]) -> dict[KeyPath, jax.ShapeDtypeStruct]:
  """The first checkpoint's leaves, after checking every other one has the same
  leaf paths and shapes (ValueError naming the two checkpoints and the leaf)."""
  first = _saved_leaves(paths[0])
  for path in paths[1:]:
    try:
      mt.check_same_shapes(_as_tree(first), _as_tree(_saved_leaves(path)))
    except ValueError as e:
      raise ValueError(f"checkpoints {paths[0]} and {path} differ: {e}") from e
  return first


def _with_defaults(method: str, method_kwargs: dict[str, Any]) -> dict[str, Any]:
  """`method_kwargs` and the defaults of the method's other keyword-only arguments."""
  parameters = inspect.signature(getattr(merge, method)).parameters.values()
  defaults = {
      p.name: p.default
      for p in parameters
      if p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
  }
  return {**defaults, **method_kwargs}


def _merge_trees(
    method: str,
    base: PyTree | None,
    models: list[PyTree],
    fishers: list[PyTree] | None,
    kwargs: dict[str, Any],
) -> PyTree:
  """`mergejax.merge.<method>` of whole or single-leaf trees."""
  fn = getattr(merge, method)
  reads = METHODS[method]
  if reads == "models":
    return fn(models, **kwargs)
  if reads == "curvature":
    return fn(models, fishers, **kwargs)
  return fn(base, models, **kwargs)


def _dry_run(method: str, kwargs: dict[str, Any], num_models: int) -> None:
  """The method on one-entry stand-in trees: it checks its keyword arguments
  (density, drop, weights...) before any leaf is read."""
  zeros, ones = {"x": np.zeros(1, np.float32)}, {"x": np.ones(1, np.float32)}
  fishers = [ones] * num_models if METHODS[method] == "curvature" else None
  _merge_trees(method, zeros, [zeros] * num_models, fishers, kwargs)


def _read_leaf(path: pathlib.Path, key_path: KeyPath, like: jax.ShapeDtypeStruct) -> PyTree:
  """The single-leaf tree `{k1: {k2: x}}` of one leaf of a checkpoint (orbax or state dict)."""
  if not _is_orbax(path):
    return _as_tree({key_path: np.asarray(_state_dict(path)[tensor_name(key_path)])})
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
      _state(path),
      args=ocp.args.PyTreeRestore(
          item=_as_tree({key_path: like}),
          restore_args=_as_tree({key_path: ocp.RestoreArgs(restore_type=np.ndarray)}),
          partial_restore=True,
      ),
  )


@functools.partial(jax.jit, static_argnames="rescale")
def _magnitudes(
    b: jax.Array, x: jax.Array, leaf_key: jax.Array | None, keep: float, rescale: str
) -> jax.Array:
  """f32[size]: |x - b| in float32, flat; with a key, DARE-dropped and rescaled
  (by the rule `task_vectors.RESCALES[rescale]`).

  The entries of one leaf of one model that `ties_thresholds` ranks, where
  `leaf_key` is `task_vectors.leaf_key(key, model index, leaf path)`.
  """
  keys = None if leaf_key is None else leaf_key[None]
  tau = task_vectors._leaf_task_vectors(b, [x], keys, keep, rescale)  # pylint: disable=protected-access
  return jnp.abs(tau[0]).astype(jnp.float32).ravel()


def _global_thresholds(
    inputs: _Inputs,
    leaves: dict[KeyPath, jax.ShapeDtypeStruct],
    density: float,
    key: jax.Array | None,
    drop: float,
    convention: task_vectors.Convention = task_vectors.CONVENTIONS["mergejax"],
) -> list[float]:
  """`ties_thresholds` of the checkpoints, with one model's magnitudes in memory.

  Model i's threshold is the k-th largest entry of |tau_i| over all leaves,
  k = `convention.keep_count(density, size)`, found by `np.partition` in one
  f32[size] buffer that each model refills.
  """
  size = sum(math.prod(like.shape) for like in leaves.values())
  k = convention.keep_count(density, size)
  magnitudes = np.empty(size, np.float32)
  thresholds = []
  for index, model in enumerate(inputs.models):
    start = 0
    for key_path, like in leaves.items():
      stop = start + math.prod(like.shape)
      (b,) = jax.tree.leaves(_read_leaf(inputs.base, key_path, like))
      (x,) = jax.tree.leaves(_read_leaf(model, key_path, like))
      leaf_key = None if key is None else task_vectors.leaf_key(key, index, key_path)
      magnitudes[start:stop] = _magnitudes(b, x, leaf_key, 1.0 - drop, convention.rescale)
      start = stop
    thresholds.append(float(np.partition(magnitudes, size - k)[size - k]))
  return thresholds


def _sign_balance(
    inputs: _Inputs, leaves: dict[KeyPath, jax.ShapeDtypeStruct], kwargs: dict[str, Any]
) -> int:
  """`ties_sign_balance` of the checkpoints: the sum of each leaf's, read one
  leaf of every checkpoint at a time (with the thresholds of a global trim)."""
  balance = 0
  for key_path, like in leaves.items():
    read = lambda p: _read_leaf(p, key_path, like)  # pylint: disable=cell-var-from-loop
    balance += merge.ties_sign_balance(
        read(inputs.base),
        [read(p) for p in inputs.models],
        kwargs["density"],
        trim=kwargs["trim"],
        thresholds=kwargs["thresholds"],
        drop=kwargs.get("drop", 0.0),
        key=kwargs.get("key"),
        convention=kwargs["convention"],
    )
  return balance


def _merge_leaf(
    method: str, inputs: _Inputs, key_path: KeyPath, like: jax.ShapeDtypeStruct, kwargs: dict[str, Any]
) -> PyTree:
  """The single-leaf tree of one merged leaf, its inputs read from every checkpoint."""
  read = lambda p: _read_leaf(p, key_path, like)
  return _merge_trees(
      method,
      read(inputs.base) if inputs.base else None,
      [read(p) for p in inputs.models],
      [read(p) for p in inputs.fishers] if inputs.fishers else None,
      kwargs,
  )


def _log_progress(progress: bool, done: int, total: int, key_path: KeyPath) -> None:
  if progress:
    logging.info("merge_checkpoints: %d/%d %s", done, total, mt.path_str(key_path))


def _merge_record(method: str, inputs: _Inputs) -> dict[str, Any]:
  """What the output's metadata says of the merge: the method and its inputs."""
  return {
      "method": method,
      "paths": [str(p) for p in inputs.models],
      "base_path": None if inputs.base is None else str(inputs.base),
      "fisher_paths": None if inputs.fishers is None else [str(p) for p in inputs.fishers],
  }


def _write_merge(
    method: str,
    inputs: _Inputs,
    leaves: dict[KeyPath, jax.ShapeDtypeStruct],
    kwargs: dict[str, Any],
    path: pathlib.Path,
    progress: bool = False,
) -> None:
  """Merges leaf by leaf into a new checkpoint at `path` (orbax partial saves)."""
  record = {}
  for done, (key_path, like) in enumerate(leaves.items(), 1):
    merged = _merge_leaf(method, inputs, key_path, like, kwargs)
    if jax.process_count() > 1:  # the same on every process: orbax writes process 0's host copy
      merged = jax.tree.map(np.asarray, merged)
    partial.save(path, merged)
    record.update(checkpoint.leaf_record(merged))
    _log_progress(progress, done, len(leaves), key_path)
  partial.finalize(path)
  metadata = {"leaves": record, "merge": _merge_record(method, inputs)}
  ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(
      path / checkpoint._METADATA,  # pylint: disable=protected-access
      args=ocp.args.JsonSave(metadata),
  )


def _write_merge_safetensors(
    method: str,
    inputs: _Inputs,
    leaves: dict[KeyPath, jax.ShapeDtypeStruct],
    kwargs: dict[str, Any],
    path: pathlib.Path,
    max_shard_size: int | str | None,
    progress: bool = False,
) -> None:
  """Merges leaf by leaf into a safetensors file (or shards) at `path`, one merged tensor in memory.

  Each tensor is a `LazyTensor` of the inputs' shape and dtype (merges keep
  both) that merges its leaf when the writer reaches it.
  """
  order = {key_path: done for done, key_path in enumerate(leaves, 1)}

  def merged(key_path: KeyPath, like: jax.ShapeDtypeStruct) -> np.ndarray:
    (x,) = jax.tree.leaves(_merge_leaf(method, inputs, key_path, like, kwargs))
    _log_progress(progress, order[key_path], len(leaves), key_path)
    return np.asarray(x)

  tensors = {
      tensor_name(key_path): state_dict.LazyTensor(
          like.shape, like.dtype, functools.partial(merged, key_path, like), tensor_name(key_path))
      for key_path, like in leaves.items()
  }
  metadata = {"mergejax_merge": json.dumps(_merge_record(method, inputs))}
  state_dict.write_safetensors(path, tensors, metadata=metadata, max_shard_size=max_shard_size)


def _barrier(name: str) -> None:
  """Waits for every process (nothing under one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _scratch_directory(out: pathlib.Path) -> pathlib.Path:
  """A new hidden directory beside `out`, made by process 0 and the same on every process."""
  if jax.process_count() == 1:
    out.parent.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".merging", dir=out.parent))
  token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
  scratch = out.parent / f".{out.name}.{token:08x}.merging"
  if jax.process_index() == 0:
    scratch.mkdir(parents=True)
  _barrier(f"merge_checkpoints: {scratch} made")
  return scratch


def _replace_directory(new: pathlib.Path, out: pathlib.Path, aside: pathlib.Path) -> None:
  """Renames `new` to `out`, moving an existing `out` to `aside` (and back on failure)."""
  if not out.exists():
    new.rename(out)
    return
  out.rename(aside)
  try:
    new.rename(out)
  except OSError:
    aside.rename(out)
    raise


class _Plan(NamedTuple):
  """The method's keyword arguments (stand-ins where a pass computes them) and the passes to run."""

  kwargs: dict[str, Any]
  thresholds_pass: bool
  balance_pass: bool
  convention: task_vectors.Convention


def _checked_kwargs(method: str, method_kwargs: dict[str, Any], num_models: int) -> _Plan:
  """`method_kwargs` with defaults, checked by a dry run (ValueError before any leaf is read)."""
  kwargs = _with_defaults(method, method_kwargs)
  thresholds_pass = kwargs.get("trim") == "global" and kwargs["thresholds"] is None
  if thresholds_pass:
    kwargs["thresholds"] = [0.0] * num_models  # stand-ins for the dry run
  _check_per_leaf(method, kwargs)
  # Methods with a global trim but no `convention` keyword (DOGE, Consensus TIES) trim as mergejax does.
  convention = task_vectors._check_convention(kwargs.get("convention", "mergejax"))  # pylint: disable=protected-access
  balance_pass = (
      "sign_balance" in kwargs
      and kwargs["sign_balance"] is None
      and convention.zero_sign == "majority"
  )
  if balance_pass:
    kwargs["sign_balance"] = 0  # a stand-in for the dry run
  _dry_run(method, kwargs, num_models)
  return _Plan(kwargs, thresholds_pass, balance_pass, convention)


def check_method_arguments(method: str, num_models: int, **method_kwargs: Any) -> None:
  """Raises ValueError for arguments `merge_checkpoints` would refuse, reading no checkpoint.

  The method's name and keyword arguments (for `num_models` models) are
  checked as `merge_checkpoints` checks them, by a dry run of the method on
  one-entry trees: for callers that do work before merging (converting
  checkpoints, say) and want every error first.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHODS)}")
  _checked_kwargs(method, method_kwargs, num_models)


def merge_checkpoints(
    method: str,
    paths: Sequence[PathLike],
    out_path: PathLike,
    *,
    base_path: PathLike | None = None,
    fisher_paths: Sequence[PathLike] | None = None,
    overwrite: bool = False,
    output_format: str = "orbax",
    max_shard_size: int | str | None = None,
    progress: bool = False,
    **method_kwargs: Any,
) -> pathlib.Path:
  """Merges the checkpoints at `paths` into `out_path`, one leaf at a time.

  The result equals `mergejax.merge.<method>` of the restored trees. As
  orbax, `restore(out_path)` reads it, and its metadata holds the leaf record
  and a `"merge"` entry naming the method and the input paths; as
  safetensors, `read_state_dict(out_path)` does, the tensors named by their
  key paths joined with dots, with that entry as JSON in the
  `__metadata__`'s `"mergejax_merge"`.

  Under several processes (`jax.distributed`) every process calls it with
  the same arguments and paths on storage all of them see: each reads and
  merges every leaf, process 0's result is written, one checkpoint (orbax
  output only).

  Args:
    method: a key of `METHODS`, the function of `mergejax.merge` of that
      name: "average", "metric_weighted_average" (pass `metrics=`), the
      task-vector merges "task_arithmetic", "ties", "dare", "dare_ties",
      "consensus_task_arithmetic", "consensus_ties", "sce", "pcb" (with
      `scope="tensor"`), "widen", "doge", and the curvature-weighted
      "fisher" and "ota".
    paths: the N >= 1 checkpoints to merge, with the same leaf paths and
      shapes: orbax checkpoints written by `mergejax.io.save` (variables
      trees of nested dicts), or state dicts that `read_state_dict` reads
      (safetensors files or sharded directories, torch files), whose tensor
      names, split at their dots, are the key paths.
    out_path: the directory of the merged checkpoint.
    base_path: the pre-trained checkpoint of the task vectors; required by
      the task-vector merges, refused by the others.
    fisher_paths: for "fisher" and "ota" only: N checkpoints, one per model,
      of its Fisher (or of its Adam second moments, for "ota").
    overwrite: replace an existing checkpoint at `out_path` (once the merge is
      complete).
    output_format: "orbax" (a `mergejax.io.save` checkpoint) or
      "safetensors" (one file, or with `max_shard_size` HF-style shards and
      an index in the directory `out_path`).
    max_shard_size: for safetensors: bytes per shard (an int or "500MB").
    progress: log each merged leaf (absl logging, INFO).
    **method_kwargs: the keyword arguments of the method, e.g. `density=0.2,
      trim="global"`, `drop=0.9, key=key`, `weights=[2, 1]`.

  Returns:
    The absolute path of the merged checkpoint.

  Raises:
    ValueError: an unknown method, a missing or extra `base_path` or
      `fisher_paths`, a setting that couples leaves (PCB's global scope), checkpoints that differ in leaf paths or shapes (the two
      checkpoints and the leaf named), a checkpoint that orbax cannot read, a
      state dict that `read_state_dict` refuses (or whose names cannot be key
      paths: `a` beside `a.b`), an unknown `output_format` (or safetensors
      output under several processes), or keyword
      arguments the method rejects: all before any leaf is read.
    FileNotFoundError: a path that does not exist (named).
    FileExistsError: `out_path` exists and `overwrite` is False.
  """
  _check_arguments(method, paths, base_path, fisher_paths)
  if output_format not in OUTPUT_FORMATS:
    raise ValueError(f"output_format {output_format!r} is not one of {OUTPUT_FORMATS}")
  if max_shard_size is not None and output_format != "safetensors":
    raise ValueError(f"max_shard_size is for safetensors output, not {output_format}")
  if output_format == "safetensors":
    if jax.process_count() > 1:
      raise ValueError(
          f"merge_checkpoints: safetensors output is written by one process; this is process"
          f" {jax.process_index()} of {jax.process_count()} (jax.distributed): run it in a single process"
          " (e.g. python -m experiments.merge_checkpoints), or write orbax output")
    state_dict.check_output_path(out_path, max_shard_size)
  out = pathlib.Path(out_path).absolute()
  if checkpoint._exists_on_process_0(out) and not overwrite:  # pylint: disable=protected-access
    raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
  inputs = _Inputs(
      models=[pathlib.Path(p).absolute() for p in paths],
      base=None if base_path is None else pathlib.Path(base_path).absolute(),
      fishers=None if fisher_paths is None else [pathlib.Path(p).absolute() for p in fisher_paths],
  )
  leaves = _common_leaves(inputs.paths())
  kwargs, thresholds_pass, balance_pass, convention = _checked_kwargs(method, method_kwargs, len(inputs.models))

  scratch = _scratch_directory(out)
  try:
    if thresholds_pass:
      kwargs["thresholds"] = _global_thresholds(
          inputs, leaves, kwargs["density"], kwargs.get("key"), kwargs.get("drop", 0.0),
          convention,
      )
    if balance_pass:
      kwargs["sign_balance"] = _sign_balance(inputs, leaves, kwargs)
    merged = scratch / ("merged" + (out.suffix if max_shard_size is None else ""))
    if output_format == "orbax":
      _write_merge(method, inputs, leaves, kwargs, merged, progress)
    else:
      _write_merge_safetensors(method, inputs, leaves, kwargs, merged, max_shard_size, progress)
    if jax.process_index() == 0:
      _replace_directory(merged, out, scratch / "replaced")
    _barrier(f"merge_checkpoints: {out} written")
  finally:
    if jax.process_index() == 0:
      shutil.rmtree(scratch, ignore_errors=True)
  return out
