"""Embedded datasets and the splits used to make pairs of models to merge.

    from mergejax import data

    ds = data.load("digits", seed=0)              # data.names() lists them
    tasks = data.split(ds, "disjoint_labels")     # or "imbalanced", "domains"
    ds2 = data.shift(ds, "blur")                  # a fixed input transform
    for xb, yb in data.batches(ds.x_train, ds.y_train, batch_size=128):
      ...

    text = data.load("stdlib_text", context=128)  # byte windows for language models
    code, prose = data.split(text, "text_domains")

Nothing is downloaded: `digits` ships with scikit-learn, `mnist1d` is
generated locally, `gaussian_mixture` is synthetic, `stdlib_text` (Python
standard-library code and prose, bytes) ships in this package. scikit-learn and mnist1d
are the optional extra `mergejax[data]`; the rest needs NumPy and SciPy only.
"""

from mergejax.data.batching import batches
from mergejax.data.dataset import Dataset
from mergejax.data.dataset import relabel
from mergejax.data.dataset import Task
from mergejax.data.dataset import TextDataset
from mergejax.data.loaders import load
from mergejax.data.loaders import names
from mergejax.data.splits import split
from mergejax.data.transforms import shift
