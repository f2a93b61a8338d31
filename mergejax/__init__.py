"""mergejax: merging trained neural networks in JAX.

    import mergejax as mj

The public API is what this module exports; see DESIGN.md for the contracts.
"""

from mergejax import data
from mergejax import io
from mergejax import models
from mergejax import spec
from mergejax import tree
from mergejax.spec import AxisRef
from mergejax.spec import GroupLayout
from mergejax.spec import MergeLayout
from mergejax.spec import PermutationSpec

__version__ = "0.1.0.dev0"
