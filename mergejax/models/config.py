"""What every zoo model's configuration provides, and the checks they share.

A zoo model is two things: a Flax module whose fields are concrete widths, and
a frozen config dataclass holding what a user chooses (`features`, `blocks`,
`num_heads`, ...). The config names the model's permutation groups with their
original sizes (`groups()`), and makes the module for any widths of those
groups (`module(widths)`); `mergejax.models.build` puts the two together with a
`MergeLayout`.
"""

import abc
from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any, ClassVar

import flax.linen as nn

from mergejax import spec as spec_lib
from mergejax.models import heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(abc.ABC):
  """Base of the zoo's configs; subclasses add fields with defaults.

  Attributes:
    num_classes: one head (an int) or one head per task (a sequence of ints).
  """

  name: ClassVar[str]
  num_classes: int | Sequence[int] = 10

  def __post_init__(self):
    self._set("num_classes", heads.check_num_classes(self.num_classes))

  def _set(self, field: str, value: Any) -> None:
    """Stores a normalised field value (the dataclass is frozen)."""
    object.__setattr__(self, field, value)

  @abc.abstractmethod
  def groups(self) -> dict[str, int]:
    """Group name -> original size, in forward order."""

  def fixed_groups(self) -> frozenset[str]:
    """Groups a merged model must never widen (attention head_dim; GQA's queries per kv head)."""
    return frozenset()

  @abc.abstractmethod
  def module(self, widths: Mapping[str, int]) -> nn.Module:
    """The model with each group at `widths[group]` units."""

  @abc.abstractmethod
  def permutation_spec(self, variables: Any) -> spec_lib.PermutationSpec:
    """The model's permutation groups written by hand (names as `groups()`).

    A group holds every axis of every variable (params and batch_stats
    alike) whose units must be permuted with the group's for the function to
    stay the same: the layer that produces the units (kernel output axis,
    bias, the norm after it, running statistics included) and every layer
    that reads them (kernel input axis, and the task heads' kernels). Model
    inputs and outputs are fixed, and size-1 axes are never listed (a group
    of size 1 has no axes). This is the rule `mergejax.trace` follows, so a
    traced spec claims the same AxisRefs.

    Args:
      variables: the model's variables or their shapes (`jax.eval_shape`),
        for what the config cannot know (the spatial size at a flatten).
    """


class SpecBuilder:
  """Collects AxisRefs group by group, in the zoo's layer conventions.

  Dense kernels are (in, out), convolution kernels HWIO, BatchNorm has scale
  and bias in `params` and mean and var in `batch_stats`. A group of size 1
  keeps its name and size but lists no axes: size-1 axes are never in groups
  (permuting them changes nothing), as in traced specs.
  """

  def __init__(self, sizes: Mapping[str, int]):
    self.sizes = dict(sizes)
    self.refs: dict[str, list[spec_lib.AxisRef]] = {g: [] for g in sizes}

  def add(self, group: str | None, path: Sequence[str], axis: int, factor=None) -> None:
    """Adds `path`'s `axis` (or its `factor` component) to `group`; None: fixed."""
    if group is not None and self.sizes[group] > 1:
      self.refs[group].append(spec_lib.AxisRef(tuple(path), axis, factor))

  def dense(self, name: Sequence[str], g_in: str | None, g_out: str | None, *, in_factor=None,
            bias: bool = True, kernel_axes: tuple[int, int] = (0, 1)) -> None:
    """A Dense layer `params/*name`: kernel (in, out) and bias (out,)."""
    self.add(g_in, ("params", *name, "kernel"), kernel_axes[0], in_factor)
    self.add(g_out, ("params", *name, "kernel"), kernel_axes[1])
    if bias:
      self.add(g_out, ("params", *name, "bias"), 0)

  def conv(self, name: Sequence[str], g_in: str | None, g_out: str, *, bias: bool) -> None:
    """A convolution `params/*name`: kernel HWIO (in: axis 2, out: axis 3), bias (out,)."""
    self.dense(name, g_in, g_out, bias=bias, kernel_axes=(2, 3))

  def norm(self, name: Sequence[str], group: str, *, running: bool) -> None:
    """A norm `*name`: scale and bias in params; with `running`, mean and var in batch_stats."""
    for leaf in ("scale", "bias"):
      self.add(group, ("params", *name, leaf), 0)
    if running:
      for leaf in ("mean", "var"):
        self.add(group, ("batch_stats", *name, leaf), 0)

  def heads(self, num_classes, group: str, in_factor=None) -> None:
    """The task heads' kernels read `group` (axis 0); their outputs are fixed."""
    names = ["head"] if isinstance(num_classes, int) else [f"head_{t}" for t in range(len(num_classes))]
    for name in names:
      self.add(group, ("params", name, "kernel"), 0, in_factor)

  def build(self) -> spec_lib.PermutationSpec:
    """The spec, with the groups in the order of `sizes`."""
    return spec_lib.PermutationSpec(self.refs, self.sizes)


def positive_int(field: str, value: Any) -> int:
  """`value` if it is a positive int, else a ValueError naming `field`."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{field} must be a positive int, got {value!r}")
  return value


def positive_ints(field: str, value: Any, length: int | None = None) -> tuple[int, ...]:
  """A sequence of positive ints as a tuple; with `length`, of that length.

  Raises:
    ValueError: naming `field`, if `value` is not such a sequence.
  """
  if isinstance(value, str) or not isinstance(value, Sequence):
    raise ValueError(f"{field} must be a sequence of positive ints, got {value!r}")
  values = tuple(positive_int(f"{field}[{i}]", v) for i, v in enumerate(value))
  if length is not None and len(values) != length:
    raise ValueError(f"{field} has {len(values)} entries, expected {length}: {values}")
  return values


def per_layer(field: str, value: Any, depth: int) -> tuple[int, ...]:
  """One positive int for every layer, or a sequence of `depth` of them."""
  if isinstance(value, int) and not isinstance(value, bool):
    return (positive_int(field, value),) * depth
  return positive_ints(field, value, depth)

