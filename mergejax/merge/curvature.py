"""Curvature from optimisation: merging weighted by Adam's second moments.

OTA merging (Mahdavinia et al., "Harnessing Optimization Dynamics for
Curvature-Informed Model Merging", arXiv 2509.11167) reads the diagonal
curvature of each fine-tuned model from its optimiser instead of computing a
Fisher: Adam's second-moment estimate nu (PyTorch's `exp_avg_sq`) is an
exponential moving average of squared gradients, a diagonal empirical Fisher
along the training trajectory. The merge is Fisher-weighted averaging
(`mj.merge.fisher`) with the preconditioner P_i = nu_i ** power as the Fisher,

    merged = sum_i P_i theta_i / sum_i P_i              (entry by entry)

which is base + sum_i P_i tau_i / sum_i P_i for task vectors tau_i = theta_i -
base: the weights sum to 1 at every entry, so merging the task vectors (as the
paper describes it) and merging the weights are the same, and the base is not
needed. The authors' implementation (pmahdavi/ota-merge,
mergekit/merge_methods/ota.py) uses power 0.5 (sqrt(nu), Adam's own
preconditioner) by default.

    nu_a = mj.merge.adam_second_moments(opt_state_a, params_a)
    nu_b = mj.merge.adam_second_moments(opt_state_b, params_b)
    merged = mj.merge.ota([params_a, params_b], [nu_a, nu_b])

Not implemented: the paper's Fast Fisher Grafting (pruning each task vector
where its saliency nu * tau ** 2 is small before the merge) and its rank-one
compression of nu.
"""

from collections.abc import Sequence
import math
from typing import Any

import jax
import optax

from mergejax import tree
from mergejax.merge.average import check_models
from mergejax.merge.fisher import _check_fishers
from mergejax.merge.fisher import fisher

PyTree = Any


def _is_adam_state(node: Any) -> bool:
  return isinstance(node, optax.ScaleByAdamState)


def _adam_state(opt_state: PyTree) -> optax.ScaleByAdamState:
  """The one `ScaleByAdamState` anywhere in an optax state tree."""
  found = [
      s for s in jax.tree.leaves(opt_state, is_leaf=_is_adam_state) if _is_adam_state(s)
  ]
  if not found:
    raise ValueError(
        "opt_state: no optax ScaleByAdamState in it (the state of optax.adam,"
        " adamw, nadam or lamb, possibly chained, injected or masked)"
    )
  if len(found) > 1:
    raise ValueError(
        f"opt_state: {len(found)} ScaleByAdamStates in it; pass the subtree of"
        " the one that updates the params"
    )
  return found[0]


def adam_second_moments(
    opt_state: PyTree, params: PyTree, *, b2: float | None = None
) -> PyTree:
  """Adam's second moments nu, shaped like `params`, from an optax state.

  Finds the `optax.ScaleByAdamState` wherever it is in `opt_state`: inside
  `optax.chain`, `optax.inject_hyperparams`, `optax.masked` (with every
  parameter unmasked) or any other state tree. optax stores nu without bias
  correction, as PyTorch's `exp_avg_sq` is, which is what the paper merges
  with; with `b2` it is corrected, nu / (1 - b2 ** count). The correction is
  one factor per model, so it changes a merge only between models trained
  for different numbers of steps.

  Args:
    opt_state: the optimiser state of the training run that made `params`.
    params: the parameters that state updates (only the structure and shapes
      are read).
    b2: Adam's decay rate of the second moment (optax's default 0.999), to
      apply the bias correction; None: nu as stored.

  Returns:
    The tree nu, of `params`' structure and shapes.

  Raises:
    ValueError: no Adam state, more than one, a nu whose structure or shapes
      differ from `params` (naming the leaf path; a masked-out parameter has
      no nu), b2 outside [0, 1), or a bias correction at step count 0.
  """
  state = _adam_state(opt_state)
  try:
    tree.check_same_shapes(params, state.nu)
  except ValueError as e:
    raise ValueError(
        f"opt_state: its Adam nu does not match params (tree 0 is params, tree"
        f" 1 is nu; a parameter masked out of the optimiser has no nu): {e}"
    ) from None
  if b2 is None:
    return state.nu
  if not 0 <= b2 < 1:
    raise ValueError(f"b2 must be in [0, 1), got {b2}")
  count = int(jax.device_get(state.count))
  if count < 1:
    raise ValueError("opt_state: Adam's step count is 0; there is no nu to correct")
  correction = 1.0 - float(b2) ** count
  return jax.tree.map(lambda v: v / correction, state.nu)


@jax.jit
def _preconditioners(second_moments: list[PyTree], power: float) -> list[PyTree]:
  return jax.tree.map(lambda v: v**power, second_moments)


def ota(
    models: Sequence[PyTree],
    second_moments: Sequence[PyTree],
    *,
    power: float = 0.5,
    weights: Sequence[float] | None = None,
    epsilon: float = 1e-30,
) -> PyTree:
  """OTA merging: Fisher-weighted averaging with nu ** power as the Fisher.

  merged = sum_i w_i P_i theta_i / sum_i w_i P_i entry by entry, with P_i =
  max(nu_i ** power, epsilon) (`mj.merge.fisher`'s floor). Equal second
  moments give the weighted average, and scaling every nu_i by one constant
  leaves the merge unchanged.

  Args:
    models: N >= 1 fine-tuned models theta_i of the same structure and leaf
      shapes.
    second_moments: N trees nu_i, each shaped like its model, finite and
      non-negative (`adam_second_moments`).
    power: the exponent on nu, finite and > 0; the paper's default 0.5 is
      Adam's preconditioner sqrt(nu), 1 uses nu as the diagonal Fisher.
    weights: N non-negative model weights w_i, not all zero; uniform when
      None (the paper's).
    epsilon: the floor on each P_i, finite and > 0; far below any nu ** power
      of a trained parameter, so that it only decides entries no model's
      training moved (all nu 0), which get the weighted average.

  Returns:
    The merged model, in the leaf dtypes of `models[0]`.

  Raises:
    ValueError: no model, mismatched models, a second-moment count other
      than N, a second-moment tree that does not match its model (naming the
      path) or that has NaN, Inf or negative entries, bad weights, power or
      epsilon.
  """
  models = check_models(models)
  if not 0 < power < math.inf:
    raise ValueError(f"power must be finite and > 0, got {power}")
  try:
    second_moments = _check_fishers(models, second_moments)
  except ValueError as e:
    raise ValueError(f"second_moments (checked as the Fishers of the merge): {e}") from None
  return fisher(
      models, _preconditioners(second_moments, power), weights=weights, epsilon=epsilon
  )
