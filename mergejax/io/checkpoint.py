"""Orbax checkpoints of variables trees, with metadata.

A checkpoint is a directory holding the variables tree (`params`, and
`batch_stats` where the model has them) and a JSON metadata item that records,
besides what the caller adds (model name and config, MergeLayout, metrics), the
path, shape and dtype of every leaf. Restoring into a target structure checks
the target against that record first, so a checkpoint that does not fit the
model fails with the offending leaf named and nothing restored.

Writes are atomic: orbax writes into a temporary directory and renames it
when complete, so a reader never sees half a checkpoint.

Under `jax.distributed` every process calls `save` with the same path and
arguments: each writes the shards of the global arrays it holds (orbax's
multi-process save, on a file system all processes share), process 0 the
metadata item, and the checkpoint is renamed complete once all have written.
Restoring never reuses the saved layout: each leaf goes where `like` or
`sharding` says, by default onto this process's first device, so a
checkpoint written by any number of processes restores in any topology.

    mj.io.save("/tmp/ckpt/a", variables, metadata={"model": "mlp"})
    abstract = jax.eval_shape(model.init, key, x)
    variables = mj.io.restore("/tmp/ckpt/a", like=abstract)
    sharded = mj.io.restore("/tmp/ckpt/a", sharding=NamedSharding(mesh, P()))
"""

from collections.abc import Mapping
import json
import os
import pathlib
import shutil
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from mergejax import tree as mt

PyTree = Any
_STATE = "state"
_METADATA = "metadata"


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def leaf_record(variables: PyTree) -> dict[str, dict[str, Any]]:
  """`{leaf path: {"shape": [...], "dtype": "float32"}}` in flattening order."""
  return {
      path: {"shape": list(np.shape(x)), "dtype": str(jax.numpy.result_type(x))}
      for path, x in mt.leaves_with_paths(variables)
  }


def save(
    path: str | os.PathLike[str],
    variables: PyTree,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes `variables` and JSON `metadata` to the directory `path`.

  Under several processes every process calls it with the same arguments
  (a collective: each writes its shards of the global arrays, process 0 the
  metadata and any removal of an old checkpoint).

  Args:
    path: the checkpoint directory; it must not exist unless `overwrite`.
    variables: a pytree of arrays (a Flax variables dict, an NNX state),
      global arrays sharded over several processes' devices included.
    metadata: JSON-serialisable information stored beside the arrays. The key
      `"leaves"` is reserved for the leaf record.
    overwrite: replace an existing checkpoint at `path`.

  Returns:
    The absolute checkpoint path.
  """
  path = pathlib.Path(path).absolute()
  metadata = dict(metadata or {})
  if "leaves" in metadata:
    raise ValueError("metadata key 'leaves' is reserved for the leaf record")
  record = {**metadata, "leaves": leaf_record(variables)}
  json.dumps(record)  # a TypeError now, not after orbax has started writing
  if _exists_on_process_0(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
      shutil.rmtree(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"mergejax.io.save: {path} cleared")
  _checkpointer().save(
      path,
      args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardSave(variables), _METADATA: ocp.args.JsonSave(record)}
      ),
  )
  return path


def _exists_on_process_0(path: pathlib.Path) -> bool:
  """Whether `path` exists, as process 0 sees it: every process decides alike."""
  exists = path.exists()
  if jax.process_count() == 1:
    return exists
  return bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))


def _existing(path: str | os.PathLike[str]) -> pathlib.Path:
  path = pathlib.Path(path).absolute()
  if not (path / _METADATA).is_dir() or not (path / _STATE).is_dir():
    what = "does not exist" if not path.exists() else "is not a mergejax checkpoint"
    raise FileNotFoundError(f"checkpoint {path} {what}")
  return path


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The metadata saved with a checkpoint, including the `"leaves"` record."""
  path = _existing(path)
  restored = _checkpointer().restore(
      path, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
  )
  return dict(restored[_METADATA])


def check_fits(path: str | os.PathLike[str], like: PyTree) -> None:
  """Raises ValueError naming the first leaf where `like` and the checkpoint differ.

  Compares leaf paths, shapes and dtypes against the checkpoint's record.
  """
  saved = load_metadata(path)["leaves"]
  wanted = leaf_record(like)
  for leaf in wanted:
    if leaf not in saved:
      raise ValueError(f"checkpoint {path}: {leaf} is not in the checkpoint")
  for leaf, info in saved.items():
    if leaf not in wanted:
      raise ValueError(f"checkpoint {path}: {leaf} is in the checkpoint, not in the target")
    if info != wanted[leaf]:
      raise ValueError(
          f"checkpoint {path}: {leaf}: saved {tuple(info['shape'])} {info['dtype']}"
          f" vs target {tuple(wanted[leaf]['shape'])} {wanted[leaf]['dtype']}"
      )


def _target_sharding(leaf: Any, sharding: Any) -> jax.sharding.Sharding:
  """The sharding a restored leaf gets: `leaf`'s own, else `sharding`, else this process's first device."""
  own = getattr(leaf, "sharding", None)
  if isinstance(own, jax.sharding.Sharding):
    return own
  if sharding is not None:
    return sharding
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract(target: PyTree, sharding: Any) -> PyTree:
  """`target` as `jax.ShapeDtypeStruct`s, each with the sharding it is restored with.

  `sharding`: None, one `Sharding`, or a pytree of them with `target`'s structure.
  """
  def abstract(x, s):
    return jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x), sharding=_target_sharding(x, s))

  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: abstract(x, sharding), target)
  try:
    return jax.tree.map(abstract, target, sharding)
  except ValueError as e:
    raise ValueError(f"restore: sharding is neither a Sharding nor a tree of them like the target: {e}") from None


def _saved_abstract(path: pathlib.Path) -> PyTree:
  """The saved tree, each array leaf a `jax.ShapeDtypeStruct` (no sharding)."""
  saved = ocp.PyTreeCheckpointHandler().metadata(path / _STATE).tree
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved,
                      is_leaf=lambda m: isinstance(m, ocp.metadata.ArrayMetadata))


def restore(path: str | os.PathLike[str], like: PyTree | None = None, *, sharding: Any = None) -> PyTree:
  """Reads the variables saved at `path`, in any topology.

  The layout the checkpoint was saved with (its devices, processes) plays
  no part: a checkpoint saved by 2 processes restores in 1, and the reverse.
  Under several processes every process calls it alike (orbax's restore is
  a collective there).

  Args:
    path: a directory written by `save`.
    like: optional target: a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g.
      `jax.eval_shape(model.init, key, x)`). The checkpoint must match it in
      leaf paths, shapes and dtypes (checked first; ValueError naming the leaf
      otherwise), and the result has its structure. A leaf with a
      `.sharding` (a jax.Array, a ShapeDtypeStruct given one) is restored
      with that sharding.
    sharding: for leaves without one of their own: a `jax.sharding.Sharding`
      for every leaf, or a pytree of them in the structure of `like` (or of
      the checkpoint). Default: this process's first device
      (`jax.local_devices()[0]`), whole.

  Returns:
    The variables tree, as saved (nested dicts) or in the structure of `like`.
  """
  path = _existing(path)
  if like is None:
    target = _saved_abstract(path)
  else:
    check_fits(path, like)
    target = like
  item = ocp.args.StandardRestore(_abstract(target, sharding))
  restored = _checkpointer().restore(path, args=ocp.args.Composite(**{_STATE: item}))
  return restored[_STATE]
