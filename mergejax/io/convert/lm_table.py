"""A converter as a table: one `Row` per tensor, the library's name <-> our variables path.

    rows = [Row("lm_head.weight", ("params", "lm_head", "kernel"), (vocab, d), transpose=True), ...]
    check_state(state, expected_shapes(rows))
    variables = to_variables(state, rows)         # {"params": {"lm_head": {"kernel": f32[d, vocab]}}}
    state_back = from_variables(variables, rows)  # {"lm_head.weight": f32[vocab, d]}

The one layout change a row knows is a transpose (a torch Linear's weight is
[out, in], a Flax Dense kernel [in, out]): all the HF language models
(`gpt2`, `llama`) need. Dtypes are kept both ways.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import re
from typing import Any, NamedTuple

import numpy as np

from mergejax import tree as mt
from mergejax.io.convert.base import Converter
from mergejax.io.convert.base import check_state
from mergejax.models import lm

PyTree = Any


class Row(NamedTuple):
  """One tensor of a state dict and the variables leaf it becomes.

  Attributes:
    name: the library's tensor name (`transformer.h.0.attn.c_attn.weight`).
    path: ours, from the variables' root (`("params", "block0", "attn_qkv", "kernel")`).
    shape: the library's shape.
    transpose: ours is the library's tensor transposed (2-D only).
  """

  name: str
  path: tuple[str, ...]
  shape: tuple[int, ...]
  transpose: bool = False

  @property
  def our_shape(self) -> tuple[int, ...]:
    return self.shape[::-1] if self.transpose else self.shape


def expected_shapes(rows: Sequence[Row]) -> dict[str, tuple[int, ...]]:
  """`{library name: library shape}` of every row."""
  return {row.name: row.shape for row in rows}


def to_variables(state: Mapping[str, Any], rows: Sequence[Row]) -> dict[str, Any]:
  """The nested variables of `rows`, read from `state` (already checked by `check_state`).

  Returns:
    `{collection: {...: np.ndarray}}`, each leaf the row's tensor (transposed
    where the row says), in the state's dtype.
  """
  out: dict[str, Any] = {}
  for row in rows:
    leaf = np.asarray(state[row.name])
    node = out
    for key in row.path[:-1]:
      node = node.setdefault(key, {})
    node[row.path[-1]] = np.ascontiguousarray(leaf.T) if row.transpose else leaf
  return out


def from_variables(variables: PyTree, rows: Sequence[Row], *,
                   where: str = "variables") -> dict[str, np.ndarray]:
  """The inverse of `to_variables`: `{library name: np.ndarray}` in the library's layout.

  Raises:
    ValueError: before anything is converted, naming every row path that
      `variables` lack, every leaf path of `variables` that no row has, and
      every leaf whose shape is not the row's.
  """
  leaves = {mt.path_str(path): leaf for path, leaf in mt.leaves_by_path(variables).items()}
  by_path = {mt.path_str(row.path): row for row in rows}
  missing = sorted(set(by_path) - set(leaves))
  unexpected = sorted(set(leaves) - set(by_path))
  misshapen = sorted(f"{p}: {tuple(np.shape(leaves[p]))}, expected {by_path[p].our_shape}"
                     for p in set(by_path) & set(leaves)
                     if tuple(np.shape(leaves[p])) != by_path[p].our_shape)
  problems = ([f"missing leaves {missing}"] if missing else []) + (
      [f"unexpected leaves {unexpected}"] if unexpected else []) + (
      [f"shapes that do not fit: {'; '.join(misshapen)}"] if misshapen else [])
  if problems:
    raise ValueError(f"{where}: " + "; ".join(problems))
  out = {}
  for path, row in by_path.items():
    leaf = np.asarray(leaves[path])
    out[row.name] = np.ascontiguousarray(leaf.T if row.transpose else leaf)
  return out


class Renamed(Mapping):
  """A view of a state dict under other names; values are passed through unread.

  `Renamed(state, rename)` has the key `rename(k)` for every key k of `state`
  (a lazy state dict stays lazy: nothing is read until a value is converted).
  """

  def __init__(self, state: Mapping[str, Any], rename: Callable[[str], str]):
    self._state = state
    self._names = {rename(k): k for k in state}
    if len(self._names) != len(state):
      raise ValueError("renaming the state dict's keys made two of them equal")

  def __getitem__(self, name: str) -> Any:
    return self._state[self._names[name]]

  def __iter__(self) -> Iterator[str]:
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)


def lm_converter(library: str, *, infer_config: Callable[[Mapping[str, Any], Mapping[str, Any] | None], dict],
                 config: Callable[[Mapping[str, Any]], lm.LMConfig], rows: Callable[[lm.LMConfig], Sequence[Row]],
                 canonical_names: Callable[[Mapping[str, Any]], Mapping[str, Any]], buffer: re.Pattern) -> Converter:
  """The `Converter` of an HF language model onto the zoo's "lm", from its table.

  Args:
    library: its name in messages ("gpt2", "llama").
    infer_config: `Converter.infer_config`.
    config: zoo kwargs -> the zoo config, refused where the library cannot hold it.
    rows: the table of one config, in the library's canonical names.
    canonical_names: a state dict in those names (e.g. a headless model's gains its prefix).
    buffer: names of non-parameter buffers a state dict may hold, ignored on load.

  The converter's `to_variables` checks every name and shape first (`check_state`;
  with a tied head a `lm_head.weight` is ignored) and stacks the layers for a
  scanned config; `from_variables` unstacks them and writes the table's names
  (a tied head written once).
  """

  def expected(kwargs):
    return expected_shapes(rows(config(kwargs)))

  def load(state, kwargs):
    cfg = config(kwargs)
    state, table = canonical_names(state), rows(cfg)
    check_state(state, expected_shapes(table), where=f"{library} state dict",
                ignore=lambda k: bool(buffer.match(k)) or (cfg.tie_embeddings and k == "lm_head.weight"))
    variables = to_variables(state, table)
    return lm.stack_layers(variables) if cfg.scan else variables

  def save(variables, kwargs):
    cfg = config(kwargs)
    return from_variables(lm.unstack_layers(variables) if cfg.scan else variables, rows(cfg),
                          where=f"{library}: zoo variables")

  return Converter(zoo_name="lm", infer_config=infer_config, expected_shapes=expected, to_variables=load,
                   from_variables=save)


def layer_count(names: Iterable[str], pattern: str, *, where: str) -> int:
  """The number of layers whose names match `pattern` (a regex whose group 1 is the index).

  Raises:
    ValueError: if the indices found are not 0..L-1 (naming them).
  """
  regex = re.compile(pattern)
  found = sorted({int(m.group(1)) for name in names if (m := regex.match(name))})
  if found != list(range(len(found))):
    raise ValueError(f"{where}: layers {found} are not numbered 0..L-1 (names matching {pattern!r})")
  return len(found)


def config_value(config: Mapping[str, Any], field: str, default: Any, supported: Sequence[Any] | None = None,
                 *, where: str) -> Any:
  """`config[field]` (`default` where absent or None), checked to be one of `supported` if given."""
  value = config.get(field)
  value = default if value is None else value
  if supported is not None and value not in supported:
    raise ValueError(f"{where}: {field}={value!r} is not supported; the zoo model has "
                     f"{' or '.join(map(repr, supported))}")
  return value
