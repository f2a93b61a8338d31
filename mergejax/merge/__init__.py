"""Merging methods, one module per family (DESIGN.md, Layout).

    merged, layout = mj.merge.pleas(model.apply, va, vb, batches, budget=1.5)
    merged, layout, achieved = mj.merge.zipit(model.apply, va, vb, batches, budget=1.5)
"""

from mergejax.merge import budget
from mergejax.merge import combine
from mergejax.merge import least_squares
from mergejax.merge import zip_match
from mergejax.merge.pleas import pleas
from mergejax.merge.pleas import Report
from mergejax.merge.zipit import zipit
