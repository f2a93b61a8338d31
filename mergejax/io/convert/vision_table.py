"""A vision family's conversion as a table: one `Entry` per layer, read both ways.

A family module lists its model's layers for a configuration (`Entry(kind,
tensors, path, dims)`: the library's tensor names, the zoo's module path, the
sizes); this module turns the table into the library's expected shapes, the
zoo's variables (`to_variables`) and back (`from_variables`), using the layout
changes of `torch_layouts`. Kinds, with the library's tensors in order:

  conv         weight f[out, in, h, w] (OIHW), bias f[out] (optional)  <-> kernel HWIO, bias
  dense        weight f[out, in], bias f[out] (optional)               <-> kernel f[in, out], bias
  layer_norm   weight, bias f[width]                                   <-> scale, bias
  batch_norm   weight, bias, running_mean, running_var f[width]        <-> params scale, bias;
                                                                           batch_stats mean, var
  attention    fused q | k | v weight and bias, output weight and bias <-> query, key, value, out
               (`torch_layouts.to_attention`); dims (embed, heads, head_dim)
  reshape      one tensor of shape dims[0] <-> the zoo leaf at `path` of shape dims[1]
               (class tokens, position embeddings, OpenCLIP's `proj`)
"""

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from mergejax.io.convert import base
from mergejax.io.convert import torch_layouts

Path = tuple[str, ...]


class Entry(NamedTuple):
  """One layer of a table.

  Attributes:
    kind: one of the kinds above.
    tensors: the library's tensor names, in the kind's order (a conv or dense
      without bias lists only its weight).
    path: the zoo module's path under `params` (and `batch_stats`), or the
      leaf's path for `reshape`.
    dims: conv (out, in, h, w); dense (out, in); norms (width,); attention
      (embed, heads, head_dim); reshape (library shape, zoo shape).
  """

  kind: str
  tensors: tuple[str, ...]
  path: Path
  dims: tuple[Any, ...]


def library_shapes(entry: Entry) -> dict[str, tuple[int, ...]]:
  """The library's tensor name -> shape of one entry."""
  d = entry.dims
  if entry.kind in ("conv", "dense"):
    shapes = [tuple(d), (d[0],)]
  elif entry.kind in ("layer_norm", "batch_norm"):
    shapes = [tuple(d)] * 4
  elif entry.kind == "attention":
    embed, heads, head_dim = d
    shapes = [(3 * heads * head_dim, embed), (3 * heads * head_dim,), (embed, heads * head_dim), (embed,)]
  elif entry.kind == "reshape":
    shapes = [tuple(d[0])]
  else:
    raise ValueError(f"unknown entry kind {entry.kind!r} for {entry.tensors}")
  return dict(zip(entry.tensors, shapes))


def shape(state: Mapping[str, Any], name: str, where: str) -> tuple[int, ...]:
  """`state[name]`'s shape, or a ValueError naming the missing key (for `infer_config`)."""
  if name not in state:
    raise ValueError(f"{where}: missing key {name!r}")
  return tuple(state[name].shape)


def expected_shapes(table: Iterable[Entry]) -> dict[str, tuple[int, ...]]:
  """Every tensor name the table reads -> its shape."""
  out = {}
  for entry in table:
    out.update(library_shapes(entry))
  return out


def zoo_paths(entry: Entry) -> list[Path]:
  """The zoo leaves, (collection, *path, leaf), that one entry reads or writes."""
  p = ("params", *entry.path)
  if entry.kind in ("conv", "dense"):
    return [(*p, "kernel")] + ([(*p, "bias")] if len(entry.tensors) == 2 else [])
  if entry.kind == "layer_norm":
    return [(*p, "scale"), (*p, "bias")]
  if entry.kind == "batch_norm":
    return [(*p, "scale"), (*p, "bias"), ("batch_stats", *entry.path, "mean"),
            ("batch_stats", *entry.path, "var")]
  if entry.kind == "attention":
    return [(*p, proj, leaf) for proj in ("query", "key", "value", "out") for leaf in ("kernel", "bias")]
  return [p]


def _zoo_leaves(entry: Entry, arrays: list[np.ndarray]) -> dict[Path, np.ndarray]:
  """One entry's library tensors -> {(collection, *path, leaf): array} of the zoo."""
  p = ("params", *entry.path)
  if entry.kind == "conv":
    out = {(*p, "kernel"): torch_layouts.to_conv_kernel(arrays[0])}
  elif entry.kind == "dense":
    out = {(*p, "kernel"): torch_layouts.to_dense_kernel(arrays[0])}
  elif entry.kind == "layer_norm":
    return {(*p, "scale"): arrays[0], (*p, "bias"): arrays[1]}
  elif entry.kind == "batch_norm":
    s = ("batch_stats", *entry.path)
    return {(*p, "scale"): arrays[0], (*p, "bias"): arrays[1], (*s, "mean"): arrays[2], (*s, "var"): arrays[3]}
  elif entry.kind == "attention":
    attention = torch_layouts.to_attention(*arrays, num_heads=entry.dims[1])
    return {(*p, proj, leaf): a for proj, leaves in attention.items() for leaf, a in leaves.items()}
  else:
    return {p: arrays[0].reshape(entry.dims[1])}
  if len(arrays) == 2:
    out[(*p, "bias")] = arrays[1]
  return out


def _library_tensors(entry: Entry, leaf) -> list[np.ndarray]:
  """One entry's zoo leaves (`leaf(path) -> array`) -> the library's tensors, in order."""
  p = ("params", *entry.path)
  if entry.kind in ("conv", "dense"):
    to_weight = {"conv": torch_layouts.from_conv_kernel, "dense": torch_layouts.from_dense_kernel}[entry.kind]
    return [to_weight(leaf((*p, "kernel")))] + ([leaf((*p, "bias"))] if len(entry.tensors) == 2 else [])
  if entry.kind == "layer_norm":
    return [leaf((*p, "scale")), leaf((*p, "bias"))]
  if entry.kind == "batch_norm":
    s = ("batch_stats", *entry.path)
    return [leaf((*p, "scale")), leaf((*p, "bias")), leaf((*s, "mean")), leaf((*s, "var"))]
  if entry.kind == "attention":
    return list(torch_layouts.from_attention({
        proj: {name: leaf((*p, proj, name)) for name in ("kernel", "bias")}
        for proj in ("query", "key", "value", "out")
    }))
  return [np.ascontiguousarray(leaf(p).reshape(entry.dims[0]))]


def to_variables(table: list[Entry], state: Mapping[str, Any], *, where: str = "state dict",
                 ignore=lambda name: False) -> dict[str, Any]:
  """The library's state dict -> the zoo's variables {"params": ..., "batch_stats": ...}.

  Raises:
    ValueError: before converting anything, naming every missing, unexpected
      (except `ignore`d) or misshapen tensor (`base.check_state`).
  """
  base.check_state(state, expected_shapes(table), where=where, ignore=ignore)
  variables: dict[str, Any] = {}
  for entry in table:
    arrays = [np.asarray(state[name]) for name in entry.tensors]
    for path, array in _zoo_leaves(entry, arrays).items():
      node = variables
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = array
  return variables


def _flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def from_variables(table: list[Entry], variables: Mapping[str, Any], *,
                   where: str = "variables") -> dict[str, np.ndarray]:
  """The zoo's variables -> the library's state dict (its names and layouts).

  Raises:
    ValueError: before converting anything, naming the zoo leaves the table
      needs but `variables` lacks, the leaves it would leave unread, and the
      tensors whose converted shapes do not fit the table.
  """
  leaves = _flatten(variables)
  needed = {path for entry in table for path in zoo_paths(entry)}
  missing = sorted("/".join(p) for p in needed - set(leaves))
  unread = sorted("/".join(p) for p in set(leaves) - needed)
  if missing or unread:
    raise ValueError(f"{where}: missing leaves {missing}; leaves no tensor is written from {unread}")
  state = {}
  for entry in table:
    tensors = _library_tensors(entry, lambda path: np.asarray(leaves[path]))
    state.update(zip(entry.tensors, tensors))
  base.check_state(state, expected_shapes(table), where=where)
  return state
