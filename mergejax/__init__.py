"""mergejax: merging trained neural networks in JAX.

    import mergejax as mj

The public API is what this module exports (and `mergejax.merge`'s); DESIGN.md,
at the root of the repository, lists it with its signatures and holds the
contracts; CONTRIBUTING.md says how to build, test and extend mergejax.
"""

from mergejax import align
from mergejax import data
from mergejax import io
from mergejax import lmc
from mergejax import merge
from mergejax import models
from mergejax import permute
from mergejax import repair
from mergejax import routing
from mergejax import spec
from mergejax import stacked
from mergejax import stats
from mergejax import trace
from mergejax import tree
from mergejax.align import activation_matching
from mergejax.align import MatchResult
from mergejax.align import ste_matching
from mergejax.align import weight_matching
from mergejax.fisher import fisher
from mergejax.fisher import fisher_accumulator
from mergejax.fisher import fisher_transform
from mergejax.lap import lap
from mergejax.permute import apply_permutation
from mergejax.permute import compose_permutations
from mergejax.permute import invert_permutation
from mergejax.permute import random_permutation
from mergejax.spec import AxisRef
from mergejax.spec import check_spec
from mergejax.spec import GroupLayout
from mergejax.spec import MergeLayout
from mergejax.spec import PermutationSpec
from mergejax.trace import capture
from mergejax.trace import permutation_spec

__version__ = "0.1.0.dev0"
