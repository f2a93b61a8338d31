"""Multi-layer perceptron: flatten, Dense + ReLU per hidden layer, head(s).

Groups: `hidden_{i}`, the units of hidden layer i.
"""

from collections.abc import Mapping, Sequence
import dataclasses

import flax.linen as nn
import jax

from mergejax import spec
from mergejax.models import config
from mergejax.models import heads
from mergejax.models import layers


class MLP(nn.Module):
  """x: f32[batch, ...] (flattened) -> logits f32[batch, num_classes].

  Attributes:
    features: the width of each hidden layer, `hidden_0`, `hidden_1`, ...
    num_classes: an int (head `head`) or a tuple (heads `head_0`, ...).
  """

  features: tuple[int, ...]
  num_classes: heads.NumClasses

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    del train  # No layer behaves differently in training.
    x = layers.flatten_dense_relu(x, self.features, "hidden")
    return heads.task_heads(x, self.num_classes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPConfig(config.ModelConfig):
  """`models.build("mlp", features=(512, 512, 512), num_classes=10)`."""

  name = "mlp"
  features: Sequence[int] = (512, 512, 512)

  def __post_init__(self):
    super().__post_init__()
    self._set("features", config.positive_ints("features", self.features))

  def groups(self) -> dict[str, int]:
    return {f"hidden_{i}": width for i, width in enumerate(self.features)}

  def module(self, widths: Mapping[str, int]) -> MLP:
    return MLP(features=tuple(widths[g] for g in self.groups()), num_classes=self.num_classes)

  def permutation_spec(self, variables) -> spec.PermutationSpec:
    del variables  # The groups follow from the config alone.
    b = config.SpecBuilder(self.groups())
    names = list(self.groups())
    for i, g in enumerate(names):
      b.dense([g], names[i - 1] if i else None, g)
    b.heads(self.num_classes, names[-1])
    return b.build()
