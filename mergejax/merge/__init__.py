"""Merging methods, one module per family (DESIGN.md, Layout).

    merged, layout = mj.merge.pleas(model.apply, va, vb, batches, budget=1.5)
    merged, layout, achieved = mj.merge.zipit(model.apply, va, vb, batches, budget=1.5)
    merged = mj.merge.ties(base, [v1, v2], density=0.2)
    merged = mj.merge.fisher([va, vb], [Fa, Fb])
"""

from mergejax.merge import budget
from mergejax.merge import combine
from mergejax.merge import least_squares
from mergejax.merge import task_vectors
from mergejax.merge import zip_match
from mergejax.merge.average import average
from mergejax.merge.average import greedy_soup
from mergejax.merge.average import uniform_soup
from mergejax.merge.fisher import fisher
from mergejax.merge.pleas import pleas
from mergejax.merge.pleas import Report
from mergejax.merge.regmean import regmean
from mergejax.merge.regmean import regmean_grams
from mergejax.merge.regmean import regmean_plus_plus
from mergejax.merge.task_vectors import dare
from mergejax.merge.task_vectors import dare_ties
from mergejax.merge.task_vectors import keep_count
from mergejax.merge.task_vectors import leaf_key
from mergejax.merge.task_vectors import task_arithmetic
from mergejax.merge.task_vectors import task_vector
from mergejax.merge.task_vectors import ties
from mergejax.merge.task_vectors import ties_thresholds
from mergejax.merge.zipit import zipit
