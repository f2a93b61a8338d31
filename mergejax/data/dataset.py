"""The containers of the data package: `Dataset`, and `Task`, a part of one.

Inputs are float32 and labels int32, checked and cast on construction. Labels
are always *global*, in `[0, num_classes)` of the whole label space, so models
trained on different tasks of one dataset agree on what a label means;
`relabel` (or `Task.local`) gives the task-local labels that a per-task head
needs.

Both are frozen dataclasses with `eq=False`: they hold arrays, so equality is
identity; compare fields with `np.testing` instead.
"""

from collections.abc import Sequence
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A classification dataset: a train set and a test set.

  Attributes:
    name: e.g. `"digits"`, or `"digits+blur"` after `shift`.
    x_train: f32[n_train, *input_shape].
    y_train: i32[n_train], in `[0, num_classes)`.
    x_test: f32[n_test, *input_shape].
    y_test: i32[n_test], in `[0, num_classes)`.
    num_classes: the size of the label space.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  def __post_init__(self):
    if self.num_classes < 1:
      raise ValueError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
    for part in ("train", "test"):
      x = np.asarray(getattr(self, f"x_{part}"), np.float32)
      y = np.asarray(getattr(self, f"y_{part}"))
      if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{self.name}: y_{part} must hold integers, got {y.dtype}")
      if y.ndim != 1 or x.ndim < 1 or len(x) != len(y):
        raise ValueError(
            f"{self.name}: x_{part} {x.shape} and y_{part} {y.shape} must have"
            " one label per example"
        )
      if y.size and (y.min() < 0 or y.max() >= self.num_classes):
        raise ValueError(f"{self.name}: y_{part} has labels outside [0, {self.num_classes})")
      object.__setattr__(self, f"x_{part}", x)
      object.__setattr__(self, f"y_{part}", y.astype(np.int32))
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ValueError(
          f"{self.name}: train inputs {self.x_train.shape[1:]} and test inputs"
          f" {self.x_test.shape[1:]} differ in shape"
      )

  @property
  def input_shape(self) -> tuple[int, ...]:
    """The shape of one input, e.g. `(8, 8, 1)`."""
    return self.x_train.shape[1:]


@dataclasses.dataclass(frozen=True, eq=False)
class Task(Dataset):
  """One task of a split: a `Dataset` whose labels are among `classes`.

  Attributes:
    classes: the task's classes, global labels; `y_train` and `y_test` hold
      only these. `num_classes` stays the size of the whole label space.
  """

  classes: tuple[int, ...] = ()

  def __post_init__(self):
    super().__post_init__()
    classes = tuple(int(c) for c in self.classes)
    object.__setattr__(self, "classes", classes)
    if not classes or len(set(classes)) != len(classes):
      raise ValueError(f"{self.name}: classes must be distinct and not empty, got {classes}")
    if min(classes) < 0 or max(classes) >= self.num_classes:
      raise ValueError(f"{self.name}: classes {classes} outside [0, {self.num_classes})")
    for part in ("train", "test"):
      if not np.isin(getattr(self, f"y_{part}"), classes).all():
        raise ValueError(f"{self.name}: y_{part} has labels outside classes {classes}")

  def local(self, y: np.ndarray) -> np.ndarray:
    """`relabel(y, self.classes)`: global labels to `0..len(classes)-1`."""
    return relabel(y, self.classes)


def relabel(y: np.ndarray, classes: Sequence[int]) -> np.ndarray:
  """Global labels as task-local ones: `classes[i]` becomes `i`.

  Args:
    y: int[n], global labels, each one of `classes`.
    classes: the task's classes, in the order of the local labels.

  Returns:
    i32[n] in `[0, len(classes))`.

  Raises:
    ValueError: if a label is not one of `classes`.
  """
  y = np.asarray(y)
  classes = np.asarray(classes)
  order = np.argsort(classes)
  pos = np.clip(np.searchsorted(classes[order], y), 0, len(classes) - 1)
  missing = classes[order][pos] != y
  if missing.any():
    unknown = sorted(set(y[missing].tolist()))
    raise ValueError(f"labels {unknown} are not among classes {classes.tolist()}")
  return order[pos].astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
  """A byte-level language-modelling dataset: windows of a byte stream.

  Window i of a part holds `context` consecutive bytes as the input and the
  same bytes shifted by one as the targets (the next byte at each position).

  Attributes:
    name: e.g. `"stdlib_text"`, or `"stdlib_text/code"` for one domain.
    x_train: i32[n_train, context], bytes in [0, vocab_size).
    y_train: i32[n_train, context], the next bytes: `y[i, t]` follows `x[i, t]`.
    x_test: i32[n_test, context].
    y_test: i32[n_test, context].
    domain_train: i32[n_train], each window's domain, an index into `domains`.
    domain_test: i32[n_test].
    domains: the domains' names, e.g. `("code", "prose")`.
    vocab_size: the number of byte values, 256.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  domain_train: np.ndarray
  domain_test: np.ndarray
  domains: tuple[str, ...]
  vocab_size: int = 256

  def __post_init__(self):
    object.__setattr__(self, "domains", tuple(self.domains))
    for part in ("train", "test"):
      x, y = (np.asarray(getattr(self, f"{k}_{part}")) for k in ("x", "y"))
      d = np.asarray(getattr(self, f"domain_{part}"))
      if x.ndim != 2 or x.shape != y.shape or d.shape != x.shape[:1]:
        raise ValueError(
            f"{self.name}: x_{part} {x.shape}, y_{part} {y.shape} and domain_{part} {d.shape}"
            " must be [n, context], [n, context] and [n]"
        )
      for k, a in (("x", x), ("y", y)):
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
          raise ValueError(f"{self.name}: {k}_{part} has tokens outside [0, {self.vocab_size})")
      if d.size and (d.min() < 0 or d.max() >= len(self.domains)):
        raise ValueError(f"{self.name}: domain_{part} outside [0, {len(self.domains)})")
      object.__setattr__(self, f"x_{part}", x.astype(np.int32))
      object.__setattr__(self, f"y_{part}", y.astype(np.int32))
      object.__setattr__(self, f"domain_{part}", d.astype(np.int32))
    if self.x_train.shape[1] != self.x_test.shape[1]:
      raise ValueError(f"{self.name}: train and test windows differ in length")

  @property
  def context(self) -> int:
    """The window length."""
    return self.x_train.shape[1]

  @property
  def num_classes(self) -> int:
    """The targets' range, `vocab_size` (as `Dataset.num_classes`)."""
    return self.vocab_size

  def domain(self, name: str) -> "TextDataset":
    """The windows of one domain, named `f"{self.name}/{name}"`."""
    if name not in self.domains:
      raise ValueError(f"{self.name}: no domain {name!r}; domains: {', '.join(self.domains)}")
    i = self.domains.index(name)
    tr, te = self.domain_train == i, self.domain_test == i
    return TextDataset(
        f"{self.name}/{name}", self.x_train[tr], self.y_train[tr], self.x_test[te], self.y_test[te],
        np.zeros(tr.sum(), np.int32), np.zeros(te.sum(), np.int32), (name,), self.vocab_size,
    )
