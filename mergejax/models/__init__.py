"""A Flax linen model zoo whose widths follow a MergeLayout.

    import mergejax as mj
    mj.models.names()                       # mlp, vgg, resnet20, resnet18, resnet50, vit, lm, moe_mlp
    sizes = mj.models.groups("mlp", features=(64, 64))    # {"hidden_0": 64, "hidden_1": 64}
    layout = mj.MergeLayout.from_ratios(sizes, 0.5)       # each group 32 + 32 + 32 wide
    model = mj.models.build("mlp", layout, features=(64, 64), num_classes=(5, 5))

Every model is called as `model.apply(variables, x, train=False)`; BatchNorm
models (VGG with `batch_norm=True`, the ResNets) keep running statistics in the
`batch_stats` collection and update them with `train=True,
mutable=["batch_stats"]`. `num_classes` is an int (one head, `head`) or a
sequence (one head per task, `head_0`, ...; the model returns a tuple).
The language model `lm` takes token ids `i32[batch, seq]` and returns logits
`f32[batch, seq, vocab_size]` (see `mergejax.models.lm`).
"""

from mergejax.models.config import ModelConfig
from mergejax.models.lm import LM
from mergejax.models.mlp import MLP
from mergejax.models.resnet import ResNet
from mergejax.models.vgg import VGG
from mergejax.models.vit import ViT
from mergejax.models.zoo import build
from mergejax.models.zoo import check_layout
from mergejax.models.zoo import config
from mergejax.models.zoo import groups
from mergejax.models.zoo import names
from mergejax.models.zoo import permutation_spec
