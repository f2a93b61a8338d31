r"""Task vectors on MNIST-1D: the digits experiment's protocol on a harder dataset.

    python -m experiments.task_vectors \
        --config=experiments/configs/task_vectors_mlp_mnist1d.py --workdir=/tmp/task_vectors_mnist1d

As `task_vectors_mlp_digits`: an MLP base over all 10 classes (pre-trained on
blurred MNIST-1D), fine-tuned into 5 two-class tasks and merged back; the
base trains longer, as MNIST-1D needs.
"""

from experiments.configs import task_vectors_mlp_digits


def get_config():
  c = task_vectors_mlp_digits.get_config()
  c.dataset = "mnist1d"
  c.num_steps = 3000
  c.task_vectors.base_transforms = (("blur", {"sigma": 2.0}),)
  return c
