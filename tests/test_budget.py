"""Tests for mergejax.merge.budget: exact allocation against brute force."""

import itertools
import math

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from mergejax.merge import budget


@st.composite
def _instances(draw):
  groups = [f"g{i}" for i in range(draw(st.integers(2, 4)))]
  options = {g: sorted(set(draw(st.lists(st.sampled_from([0.0, 0.25, 0.4, 0.5, 0.75]), min_size=1,
                                               max_size=4))) | {1.0}) for g in groups}
  losses = {g: [draw(st.floats(0, 10)) for _ in options[g]] for g in groups}
  shapes = st.one_of(st.just(()), st.tuples(st.sampled_from(groups)),
                     st.tuples(st.sampled_from(groups), st.sampled_from(groups)),
                     st.tuples(st.sampled_from(groups), st.sampled_from(groups), st.sampled_from(groups)))
  terms = [budget.CostTerm(draw(st.floats(0.1, 100)), draw(shapes)) for _ in range(draw(st.integers(1, 6)))]
  return terms, options, losses, draw(st.floats(1.0, 2.0))


@hypothesis.settings(max_examples=60)
@hypothesis.given(_instances())
def test_milp_is_as_good_as_brute_force_and_meets_the_budget(instance):
  terms, options, losses, b = instance
  exact = budget.allocate(terms, options, losses, b, method="milp")
  brute = budget.allocate(terms, options, losses, b, method="brute")
  assert exact.cost <= b + 1e-9
  assert exact.loss == pytest.approx(brute.loss, abs=1e-6)
  assert exact.cost == pytest.approx(budget.relative_cost(terms, exact.ratios))


def test_relative_cost_is_the_formula():
  terms = [budget.CostTerm(2.0, ("a", "b")), budget.CostTerm(3.0, ("a", "a")), budget.CostTerm(5.0, ("b",))]
  ratios = {"a": 0.5, "b": 0.25}
  want = (2 * (2 - 0.125) + 3 * (2 - 0.25) + 5 * (2 - 0.25)) / 10
  assert budget.relative_cost(terms, ratios) == pytest.approx(want)
  assert budget.relative_cost(terms, {"a": 1.0, "b": 1.0}) == pytest.approx(1.0)
  assert budget.relative_cost(terms, {"a": 0.0, "b": 0.0}) == pytest.approx(2.0)
  assert budget.relative_cost(terms + [budget.CostTerm(10.0, ())], {"a": 0.0, "b": 0.0}) == pytest.approx(1.5)


def test_a_full_budget_keeps_everything_when_merging_costs():
  terms = [budget.CostTerm(1.0, ("a", "b")), budget.CostTerm(1.0, ("b",))]
  options = {"a": [0.0, 0.5, 1.0], "b": [0.0, 0.5, 1.0]}
  losses = {"a": [0.0, 1.0, 2.0], "b": [0.0, 3.0, 4.0]}
  assert budget.allocate(terms, options, losses, 2.0).ratios == {"a": 0.0, "b": 0.0}
  assert budget.allocate(terms, options, losses, 1.0).ratios == {"a": 1.0, "b": 1.0}


@hypothesis.given(_instances())
def test_uniform_and_stage_cut_merge_as_little_as_the_budget_allows(instance):
  terms, options, _, b = instance
  grid = [0.0, 0.5, 1.0]
  common = {g: grid for g in options}
  alloc = budget.uniform(terms, common, b)
  j = grid.index(next(iter(alloc.ratios.values())))
  assert alloc.cost <= b + 1e-12 and len(set(alloc.ratios.values())) == 1
  assert all(budget.relative_cost(terms, {g: grid[i] for g in options}) > b for i in range(j))
  order = list(options)
  cut = budget.stage_cut(terms, order, b)
  k = sum(r == 1.0 for r in cut.ratios.values())
  assert [cut.ratios[g] for g in order] == [1.0] * k + [0.0] * (len(order) - k)
  assert cut.cost <= b + 1e-12
  assert all(budget.relative_cost(terms, {g: float(i < kk) for i, g in enumerate(order)}) > b for kk in range(k))


@pytest.mark.parametrize("b,options,match", [
    (0.9, {"a": [0.0, 1.0]}, r"in \[1, 2\]"),
    (2.5, {"a": [0.0, 1.0]}, r"in \[1, 2\]"),
    (float("nan"), {"a": [0.0, 1.0]}, r"in \[1, 2\]"),
    (1.2, {"a": [0.0, 0.5]}, "below 1.5"),
    (1.5, {"a": [0.0, 1.5]}, "outside"),
    (1.5, {"a": []}, "no options"),
])
def test_bad_inputs_are_refused(b, options, match):
  terms = [budget.CostTerm(1.0, ("a",))]
  losses = {g: [0.0] * len(o) for g, o in options.items()}
  with pytest.raises(ValueError, match=match):
    budget.allocate(terms, options, losses, b)


def test_mismatched_losses_and_unknown_groups_are_refused():
  options = {"a": [0.0, 1.0]}
  with pytest.raises(ValueError, match="2 options but 1 losses"):
    budget.allocate([budget.CostTerm(1.0, ("a",))], options, {"a": [0.0]}, 1.5)
  with pytest.raises(ValueError, match="without options"):
    budget.allocate([budget.CostTerm(1.0, ("b",))], options, {"a": [0.0, 0.0]}, 1.5)
  with pytest.raises(ValueError, match="more than 0"):
    budget.allocate([budget.CostTerm(0.0, ("a",))], options, {"a": [0.0, 0.0]}, 1.5)
