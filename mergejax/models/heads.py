"""Classifier heads shared by the zoo: one head, or one per task.

A model trained on all classes has one head, `head`, and returns
`f32[batch, num_classes]`. A model that carries one head per task of a
disjoint-label split (merged models of different tasks keep their own heads)
is built with `num_classes=(5, 5)`: heads `head_0`, `head_1`, ... read the same
features and the model returns a tuple `(f32[batch, 5], f32[batch, 5])`.
Heads are outputs, so they belong to no permutation group.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

NumClasses = int | tuple[int, ...]


def check_num_classes(num_classes: int | Sequence[int]) -> NumClasses:
  """Returns `num_classes` as an int or a tuple of ints, or raises ValueError."""
  if isinstance(num_classes, Sequence) and not isinstance(num_classes, str):
    values = tuple(num_classes)
    if not values:
      raise ValueError("num_classes: an empty sequence of task heads")
  else:
    values = (num_classes,)
  for n in values:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"num_classes must be a positive int or a sequence of them, got {num_classes!r}")
  return values if isinstance(num_classes, Sequence) else values[0]


def task_heads(features: jax.Array, num_classes: NumClasses, *,
               use_bias: bool = True) -> jax.Array | tuple[jax.Array, ...]:
  """Applies the head(s) inside the calling module's `nn.compact` method.

  Args:
    features: f32[batch, d], what every head reads.
    num_classes: an int (one head, `head`) or a tuple (heads `head_0`, ...).
    use_bias: whether the heads have a bias (OpenCLIP's output projection has none).

  Returns:
    f32[batch, num_classes], or a tuple of f32[batch, num_classes[t]].
  """
  if isinstance(num_classes, int):
    return nn.Dense(num_classes, use_bias=use_bias, name="head")(features)
  return tuple(
      nn.Dense(n, use_bias=use_bias, name=f"head_{t}")(features) for t, n in enumerate(num_classes)
  )
