"""Orbax checkpoints of variables trees, with metadata.

A checkpoint is a directory holding the variables tree (`params`, and
`batch_stats` where the model has them) and a JSON metadata item that records,
besides what the caller adds (model name and config, MergeLayout, metrics), the
path, shape and dtype of every leaf. Restoring into a target structure checks
the target against that record first, so a checkpoint that does not fit the
model fails with the offending leaf named and nothing restored.

Writes are atomic: orbax writes into a temporary directory and renames it
when complete, so a reader never sees half a checkpoint.

    mj.io.save("/tmp/ckpt/a", variables, metadata={"model": "mlp"})
    abstract = jax.eval_shape(model.init, key, x)
    variables = mj.io.restore("/tmp/ckpt/a", like=abstract)
"""

from collections.abc import Mapping
import json
import os
import pathlib
import shutil
from typing import Any

import jax
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

  Args:
    path: the checkpoint directory; it must not exist unless `overwrite`.
    variables: a pytree of arrays (a Flax variables dict, an NNX state).
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
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  record = {**metadata, "leaves": leaf_record(variables)}
  json.dumps(record)  # a TypeError now, not after orbax has started writing
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.exists():
    shutil.rmtree(path)
  _checkpointer().save(
      path,
      args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardSave(variables), _METADATA: ocp.args.JsonSave(record)}
      ),
  )
  return path


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


def restore(path: str | os.PathLike[str], like: PyTree | None = None) -> PyTree:
  """Reads the variables saved at `path`.

  Args:
    path: a directory written by `save`.
    like: optional target: a pytree of arrays or `jax.ShapeDtypeStruct`s (e.g.
      `jax.eval_shape(model.init, key, x)`). The checkpoint must match it in
      leaf paths, shapes and dtypes (checked first; ValueError naming the leaf
      otherwise), and the result has its structure.

  Returns:
    The variables tree, as saved (nested dicts) or in the structure of `like`.
  """
  path = _existing(path)
  if like is None:
    item = ocp.args.StandardRestore()
  else:
    check_fits(path, like)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), like
    )
    item = ocp.args.StandardRestore(abstract)
  restored = _checkpointer().restore(path, args=ocp.args.Composite(**{_STATE: item}))
  return restored[_STATE]
