"""Merging methods, one module per family (DESIGN.md, Layout).

    merged, layout = mj.merge.pleas(model.apply, va, vb, batches, budget=1.5)
    merged, layout, achieved = mj.merge.zipit(model.apply, va, vb, batches, budget=1.5)
    merged = mj.merge.ties(base, [v1, v2], density=0.2)
    merged = mj.merge.fisher([va, vb], [Fa, Fb])
"""

from mergejax.merge import budget
from mergejax.merge import combine
from mergejax.merge import compact
from mergejax.merge import least_squares
from mergejax.merge import task_vectors
from mergejax.merge import zip_match
from mergejax.merge.average import average
from mergejax.merge.average import greedy_soup
from mergejax.merge.average import uniform_soup
from mergejax.merge.compact import compact_apply
from mergejax.merge.compact import compact_variables
from mergejax.merge.compact import CompactKernel
from mergejax.merge.compact import dense_variables
from mergejax.merge.compact import kernel_inputs
from mergejax.merge.consensus import consensus_mask
from mergejax.merge.consensus import consensus_task_arithmetic
from mergejax.merge.consensus import consensus_ties
from mergejax.merge.consensus import multitask_vector
from mergejax.merge.consensus import pack_mask
from mergejax.merge.consensus import tall_masks
from mergejax.merge.consensus import tall_reconstruct
from mergejax.merge.consensus import unpack_mask
from mergejax.merge.continual import ContinualMerge
from mergejax.merge.continual import merge_in_order
from mergejax.merge.continual import opcm
from mergejax.merge.continual import opcm_projection
from mergejax.merge.continual import opcm_scaling
from mergejax.merge.continual import OPCMState
from mergejax.merge.curvature import adam_second_moments
from mergejax.merge.curvature import ota
from mergejax.merge.doge import doge
from mergejax.merge.fisher import fisher
from mergejax.merge.lines import blocks_in_read_order
from mergejax.merge.lines import depth_scales
from mergejax.merge.lines import lines
from mergejax.merge.lines import multitask_alpha
from mergejax.merge.lines import scale_by_depth
from mergejax.merge.lora import LoRA
from mergejax.merge.lora import lora_apply
from mergejax.merge.lora import lora_compress
from mergejax.merge.lora import lora_extract
from mergejax.merge.lora import lora_from_peft
from mergejax.merge.lora import lora_lego
from mergejax.merge.lora import lora_sum
from mergejax.merge.lora import lora_to_peft
from mergejax.merge.lora import reversible_merge
from mergejax.merge.lora import reversible_task
from mergejax.merge.lora import ReversibleMerge
from mergejax.merge.metric_weighted import metric_weighted_average
from mergejax.merge.metric_weighted import metric_weights
from mergejax.merge.pcb import pcb
from mergejax.merge.pleas import pleas
from mergejax.merge.pleas import Report
from mergejax.merge.pleas_select import select_matching
from mergejax.merge.pleas_select import Selection
from mergejax.merge.regmean import regmean
from mergejax.merge.regmean import regmean_grams
from mergejax.merge.regmean import regmean_plus_plus
from mergejax.merge.sce import sce
from mergejax.merge.task_vectors import dare
from mergejax.merge.task_vectors import dare_ties
from mergejax.merge.task_vectors import keep_count
from mergejax.merge.task_vectors import leaf_key
from mergejax.merge.task_vectors import task_arithmetic
from mergejax.merge.task_vectors import task_vector
from mergejax.merge.task_vectors import ties
from mergejax.merge.task_vectors import ties_sign_balance
from mergejax.merge.task_vectors import ties_thresholds
from mergejax.merge.widen import widen
from mergejax.merge.zipit import zipit
