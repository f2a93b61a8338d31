"""The layout changes between PyTorch's tensors and Flax's, each with its inverse.

Pure NumPy, exact (transposes, reshapes, slices and concatenations; no
arithmetic), dtypes kept. The `to_*` functions take PyTorch's layout and give
Flax's; the `from_*` functions give PyTorch's back, as contiguous arrays (what
safetensors writes).
"""

from collections.abc import Mapping
from typing import Any

import numpy as np


def to_conv_kernel(weight: np.ndarray) -> np.ndarray:
  """A convolution's weight f[out, in, h, w] (OIHW) -> Flax's kernel f[h, w, in, out] (HWIO)."""
  return np.transpose(weight, (2, 3, 1, 0))


def from_conv_kernel(kernel: np.ndarray) -> np.ndarray:
  """Flax's kernel f[h, w, in, out] -> PyTorch's weight f[out, in, h, w]."""
  return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def to_dense_kernel(weight: np.ndarray) -> np.ndarray:
  """A Linear's weight f[out, in] (y = x W^T) -> Flax's kernel f[in, out] (y = x K)."""
  return np.transpose(weight)


def from_dense_kernel(kernel: np.ndarray) -> np.ndarray:
  """Flax's kernel f[in, out] -> a Linear's weight f[out, in]."""
  return np.ascontiguousarray(np.transpose(kernel))


def to_attention(qkv_weight: np.ndarray, qkv_bias: np.ndarray, out_weight: np.ndarray,
                 out_bias: np.ndarray, num_heads: int) -> dict[str, dict[str, np.ndarray]]:
  """A fused q | k | v projection and the output projection -> Flax's MultiHeadDotProductAttention.

  PyTorch's `nn.MultiheadAttention` (`in_proj_weight`, `out_proj`) and timm's
  `Attention` (`qkv`, `proj`) stack the three projections along the output
  axis, each `num_heads` heads of `head_dim` units, head-major.

  Args:
    qkv_weight: f[3 heads head_dim, embed].
    qkv_bias: f[3 heads head_dim].
    out_weight: f[embed, heads head_dim].
    out_bias: f[embed].
    num_heads: the head count.

  Returns:
    {"query" | "key" | "value": {"kernel": f[embed, heads, head_dim], "bias": f[heads, head_dim]},
     "out": {"kernel": f[heads, head_dim, embed], "bias": f[embed]}}.
  """
  embed = qkv_weight.shape[1]
  head_dim = qkv_weight.shape[0] // (3 * num_heads)
  weights = np.split(qkv_weight, 3, axis=0)
  biases = np.split(qkv_bias, 3, axis=0)
  out = {
      name: {"kernel": np.transpose(w).reshape(embed, num_heads, head_dim),
             "bias": b.reshape(num_heads, head_dim)}
      for name, w, b in zip(("query", "key", "value"), weights, biases)
  }
  out["out"] = {"kernel": np.transpose(out_weight).reshape(num_heads, head_dim, out_weight.shape[0]),
                "bias": out_bias}
  return out


def from_attention(attention: Mapping[str, Mapping[str, Any]]) -> tuple[np.ndarray, ...]:
  """The inverse of `to_attention`: -> (qkv_weight, qkv_bias, out_weight, out_bias)."""
  parts = [attention[name] for name in ("query", "key", "value")]
  embed = np.shape(parts[0]["kernel"])[0]
  qkv_weight = np.concatenate([np.transpose(np.reshape(p["kernel"], (embed, -1))) for p in parts])
  qkv_bias = np.concatenate([np.reshape(p["bias"], -1) for p in parts])
  out_kernel = np.asarray(attention["out"]["kernel"])
  out_weight = np.transpose(out_kernel.reshape(-1, out_kernel.shape[-1]))
  return (qkv_weight, qkv_bias, np.ascontiguousarray(out_weight),
          np.ascontiguousarray(attention["out"]["bias"]))
