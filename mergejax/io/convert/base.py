"""The converter type and the key check every family runs first."""


from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

PyTree = Any


class Converter(NamedTuple):
  """One library's family of models <-> one zoo model.

  Attributes:
    zoo_name: the zoo model it converts to (`mj.models.build(zoo_name, **kwargs)`).
    infer_config: `(state, library_config | None) -> kwargs` of `models.build`,
      from the tensor names and shapes (depth, widths) and, where shapes cannot
      say it (epsilons, RoPE base), the library's own config (e.g. HF's
      config.json as a dict).
    expected_shapes: `kwargs -> {tensor name: shape}`, every tensor the
      library's state dict holds for that configuration.
    to_variables: `(state, kwargs) -> variables` of the zoo model.
    from_variables: `(variables, kwargs) -> {tensor name: np.ndarray}`, the
      inverse, in the library's names and layouts (a tied tensor written once).
  """

  zoo_name: str
  infer_config: Callable[[Mapping[str, Any], Mapping[str, Any] | None], dict[str, Any]]
  expected_shapes: Callable[[Mapping[str, Any]], dict[str, tuple[int, ...]]]
  to_variables: Callable[[Mapping[str, Any], Mapping[str, Any]], PyTree]
  from_variables: Callable[[PyTree, Mapping[str, Any]], dict[str, Any]]


def check_state(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *, where: str = "state dict",
                ignore: Callable[[str], bool] = lambda name: False) -> None:
  """Raises ValueError naming every key of `state` that does not fit `expected`.

  Args:
    state: name -> array (anything with `.shape`, e.g. a lazy state dict's entries).
    expected: name -> shape that the converter reads.
    where: what `state` is, for the message (e.g. the file it came from).
    ignore: names of `state` that are not parameters and may be left unread
      (buffers such as HF's `attn.masked_bias`).
  """
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(k for k in set(state) - set(expected) if not ignore(k))
  misshapen = sorted(f"{k}: {tuple(state[k].shape)}, expected {tuple(expected[k])}"
                     for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
  problems = ([f"missing keys {missing}"] if missing else []) + (
      [f"unexpected keys {unexpected}"] if unexpected else []) + (
      [f"shapes that do not fit: {'; '.join(misshapen)}"] if misshapen else [])
  if problems:
    raise ValueError(f"{where}: " + "; ".join(problems))

