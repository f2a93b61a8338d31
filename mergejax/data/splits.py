"""Splits of one dataset into tasks, to train the pairs of models to merge.

    tasks = split(ds, "disjoint_labels", classes=((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)))

Kinds, as in the model-merging literature:

- `"disjoint_labels"`: one task per group of classes (default: the two halves
  of the label space), each with the train and test examples of its classes.
- `"imbalanced"`: two class-imbalanced halves of the train set (Git Re-Basin's
  and ZipIt!'s biased splits): task A takes a fraction `p` of each class of the
  first half of the label space and `1 - p` of each other class, task B the
  rest. Both keep all classes and the whole test set.
- `"domains"`: disjoint random parts of the train set, one per transform (see
  `transforms`), each transformed with a copy of the whole test set: one label
  space seen through different domains.
- `"replicas"`: `count` copies of the whole dataset, for models that differ
  only in their seed (Git Re-Basin's setting).
- `"text_domains"`: a `TextDataset` (`"stdlib_text"`) cut into its domains
  (code, prose): one language model trained on each makes a pair to merge.

Labels stay global (`Task.local` maps them to a task's own `0..k-1`). Train
sets of the tasks of one split never share an example, except for replicas. A split is
deterministic given its seed; options are checked before any work.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import operator
from typing import Any

import numpy as np

from mergejax.data import dispatch
from mergejax.data.dataset import Dataset
from mergejax.data.dataset import Task
from mergejax.data.dataset import TextDataset
from mergejax.data.transforms import transform_fn


def disjoint_labels(
    ds: Dataset, *, classes: Sequence[Sequence[int]] | None = None
) -> tuple[Task, ...]:
  """One task per group of classes, with all the examples of its classes.

  Args:
    ds: the dataset.
    classes: groups of global labels, pairwise disjoint, e.g.
      `((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))`, the default for 10 classes: the
      first `num_classes // 2` classes, then the rest. Groups need not cover
      every class.

  Returns:
    One `Task` per group, named `f"{ds.name}/disjoint_labels/{i}"`.
  """
  if classes is None:
    groups = _halves(ds.num_classes)
  else:
    groups = _class_groups(classes, ds.num_classes)
  return tuple(
      _task(ds, f"{ds.name}/disjoint_labels/{i}", np.isin(ds.y_train, g), np.isin(ds.y_test, g), g)
      for i, g in enumerate(groups)
  )


def imbalanced(ds: Dataset, *, seed: int = 0, p: float = 0.8) -> tuple[Task, Task]:
  """Two class-imbalanced, disjoint halves of the train set.

  Args:
    ds: the dataset, with at least 2 classes.
    seed: seeds which examples of a class go to which task.
    p: in [0, 1]: task A's share of each class in the first `num_classes // 2`
      classes (rounded per class), and task B's share of each other class.

  Returns:
    `(A, B)`, named `f"{ds.name}/imbalanced/{0, 1}"`: their train sets are
    disjoint and together the whole train set; both hold the whole test set
    and all classes.
  """
  if not 0 <= p <= 1:
    raise ValueError(f"imbalanced: p must be in [0, 1], got {p}")
  if ds.num_classes < 2:
    raise ValueError(f"imbalanced: needs at least 2 classes, {ds.name} has {ds.num_classes}")
  rng = np.random.default_rng(seed)
  in_a = np.zeros(len(ds.y_train), bool)
  for c in range(ds.num_classes):
    members = rng.permutation(np.flatnonzero(ds.y_train == c))
    share = p if c < ds.num_classes // 2 else 1 - p
    in_a[members[:round(share * len(members))]] = True
  test = np.ones(len(ds.y_test), bool)
  everything = tuple(range(ds.num_classes))
  return (
      _task(ds, f"{ds.name}/imbalanced/0", in_a, test, everything),
      _task(ds, f"{ds.name}/imbalanced/1", ~in_a, test, everything),
  )


def domains(
    ds: Dataset,
    *,
    seed: int = 0,
    transforms: Sequence[str | tuple[str, Mapping[str, Any]]] = ("identity", "blur"),
) -> tuple[Task, ...]:
  """Disjoint random parts of the train set, each in its own domain.

  Args:
    ds: the dataset.
    seed: seeds the partition and each transform's randomness.
    transforms: one per task: a transform name (`"identity"`, `"noise"`,
      `"blur"`, `"shift"`), or `(name, options)`, e.g. `("noise", {"std": 0.3})`.

  Returns:
    One `Task` per transform, named `f"{ds.name}/domains/{i}+{name}"`: a
    random part of the train set (parts differ in size by at most one) and a
    copy of the test set, both transformed; all classes.
  """
  entries = [_transform_entry(t) for t in transforms]
  if not entries or len(ds.y_train) < len(entries):
    raise ValueError(
        f"domains: needs 1 to {len(ds.y_train)} transforms (one per task), got {len(entries)}"
    )
  seeds = np.random.SeedSequence(seed).spawn(len(entries) + 1)
  fns = [transform_fn(name, seed=s, **opts) for (name, opts), s in zip(entries, seeds[1:])]
  order = np.random.default_rng(seeds[0]).permutation(len(ds.y_train))
  test = np.ones(len(ds.y_test), bool)
  everything = tuple(range(ds.num_classes))
  tasks = []
  for i, ((name, _), fn, part) in enumerate(zip(entries, fns, np.array_split(order, len(entries)))):
    task = _task(ds, f"{ds.name}/domains/{i}+{name}", np.sort(part), test, everything)
    tasks.append(dataclasses.replace(task, x_train=fn(task.x_train), x_test=fn(task.x_test)))
  return tuple(tasks)


def replicas(ds: Dataset, *, count: int = 2) -> tuple[Task, ...]:
  """`count` tasks that are each the whole dataset, named `f"{ds.name}/replicas/{i}"`."""
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f"replicas: count must be a positive int, got {count!r}")
  everything = np.ones(len(ds.y_train), bool), np.ones(len(ds.y_test), bool)
  return tuple(
      _task(ds, f"{ds.name}/replicas/{i}", *everything, tuple(range(ds.num_classes)))
      for i in range(count)
  )


def text_domains(ds: TextDataset) -> tuple[TextDataset, ...]:
  """One `TextDataset` per domain of `ds`, in `ds.domains` order.

  The windows of different domains never share a byte of the corpus (each
  domain's stream is windowed on its own), train or test.
  """
  if not isinstance(ds, TextDataset):
    raise ValueError(f"text_domains: splits a TextDataset (e.g. 'stdlib_text'), got {type(ds).__name__}")
  return tuple(ds.domain(name) for name in ds.domains)


SPLITS = {
    "disjoint_labels": disjoint_labels, "imbalanced": imbalanced, "domains": domains,
    "replicas": replicas, "text_domains": text_domains,
}


def split(ds: Dataset, kind: str, *, seed: int = 0, **options: Any) -> tuple[Task, ...]:
  """Splits a dataset into tasks; see each kind for its options.

  Args:
    ds: the dataset.
    kind: `"disjoint_labels"`, `"imbalanced"`, `"domains"`, `"replicas"` or
      `"text_domains"`.
    seed: the split's seed (unused by `"disjoint_labels"`, which draws nothing).
    **options: the kind's options: `classes` (disjoint_labels), `p`
      (imbalanced), `transforms` (domains).

  Returns:
    The tasks, in a fixed order; the same dataset, seed and options give the
    same arrays.

  Raises:
    ValueError: for an unknown kind or option, or an invalid option value.
  """
  return dispatch.bind(SPLITS, "split", kind, {"seed": seed}, options)(ds)


def _task(
    ds: Dataset, name: str, train: np.ndarray, test: np.ndarray, classes: Sequence[int]
) -> Task:
  """The task of `ds`'s examples selected by `train` and `test` (masks or indices)."""
  return Task(
      name=name,
      x_train=ds.x_train[train], y_train=ds.y_train[train],
      x_test=ds.x_test[test], y_test=ds.y_test[test],
      num_classes=ds.num_classes, classes=tuple(classes),
  )


def _halves(num_classes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  if num_classes < 2:
    raise ValueError(f"disjoint_labels: needs at least 2 classes to halve, got {num_classes}")
  half = num_classes // 2
  return tuple(range(half)), tuple(range(half, num_classes))


def _class_groups(classes: Any, num_classes: int) -> tuple[tuple[int, ...], ...]:
  """`classes` as a tuple of int tuples, checked to be disjoint and known."""
  try:
    groups = tuple(tuple(operator.index(c) for c in g) for g in classes)
  except TypeError as e:
    raise ValueError(
        f"disjoint_labels: classes must be groups of int labels, got {classes!r}"
    ) from e
  if not groups or not all(groups):
    raise ValueError(f"disjoint_labels: classes must be non-empty groups, got {classes!r}")
  flat = [c for g in groups for c in g]
  unknown = sorted({c for c in flat if not 0 <= c < num_classes})
  if unknown:
    raise ValueError(f"disjoint_labels: unknown classes {unknown}, not in [0, {num_classes})")
  repeated = sorted({c for c in flat if flat.count(c) > 1})
  if repeated:
    raise ValueError(f"disjoint_labels: classes {repeated} overlap: groups must be disjoint")
  return groups


def _transform_entry(entry: Any) -> tuple[str, dict[str, Any]]:
  """A `transforms` entry as `(name, options)`."""
  if isinstance(entry, str):
    return entry, {}
  if (isinstance(entry, Sequence) and len(entry) == 2
      and isinstance(entry[0], str) and isinstance(entry[1], Mapping)):
    return entry[0], dict(entry[1])
  raise ValueError(f"domains: a transform is a name or (name, options), got {entry!r}")
