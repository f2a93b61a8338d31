"""Layers the zoo's models share, configured once."""

import flax.linen as nn
import jax


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
  """BatchNorm as in PyTorch's defaults (running-average momentum 0.1, eps 1e-5).

  Running statistics live in the `batch_stats` collection; with `train=True`
  they are updated (apply with `mutable=["batch_stats"]`), otherwise used.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def check_image(model: str, x: jax.Array) -> None:
  """Raises ValueError unless `x` is a batch of images `[batch, h, w, c]`."""
  if x.ndim != 4:
    raise ValueError(
        f"{model} expects images f32[batch, height, width, channels], got shape {x.shape}"
    )


def flatten_dense_relu(x: jax.Array, widths: tuple[int, ...], prefix: str) -> jax.Array:
  """Flattens `x: f32[batch, ...]`, then Dense + ReLU layers `{prefix}_{i}`.

  Returns:
    f32[batch, widths[-1]] (or the flattened input when `widths` is empty).
  """
  x = x.reshape(x.shape[0], -1)
  for i, width in enumerate(widths):
    x = nn.relu(nn.Dense(width, name=f"{prefix}_{i}")(x))
  return x
