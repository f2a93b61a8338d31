"""Tests for mergejax.spec: MergeLayout arithmetic, validation, JSON."""

import json

import hypothesis
from hypothesis import strategies as st
import pytest

from mergejax.spec import AxisRef, GroupLayout, MergeLayout, PermutationSpec, round_half_up

sizes_st = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 512), min_size=1)


@hypothesis.given(sizes_st, st.floats(0, 1))
def test_from_ratios_counts(sizes, r):
  layout = MergeLayout.from_ratios(sizes, r)
  for g, n in sizes.items():
    m, na, nb = layout[g]
    assert m == round_half_up(r * n)
    assert na == nb == n - m
    assert m + na == n  # each original model's units are all placed once
    assert n <= layout[g].width <= 2 * n


@hypothesis.given(sizes_st)
def test_ratio_one_is_identity_and_zero_keeps_both(sizes):
  assert MergeLayout.from_ratios(sizes, 1.0) == MergeLayout.identity(sizes)
  assert MergeLayout.from_ratios(sizes, 0.0).widths() == {g: 2 * n for g, n in sizes.items()}


def test_round_half_up_is_not_bankers():
  assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999)] == [1, 2, 3, 2]


def test_per_group_ratios_default_to_one():
  layout = MergeLayout.from_ratios({"a": 10, "b": 10}, {"a": 0.3})
  assert layout["a"] == GroupLayout(3, 7, 7)
  assert layout["b"] == GroupLayout(10, 0, 0)


@hypothesis.given(sizes_st, st.floats(0, 1))
def test_json_round_trip(sizes, r):
  layout = MergeLayout.from_ratios(sizes, r)
  again = MergeLayout.from_json(json.loads(json.dumps(layout.to_json())))
  assert again == layout
  assert hash(again) == hash(layout)


@pytest.mark.parametrize(
    "groups, message",
    [
        ({"a": (1, 2)}, "expected \\(n_merged, n_a, n_b\\)"),
        ({"a": (1, -1, 0)}, "non-negative ints"),
        ({"a": (1.5, 0, 0)}, "non-negative ints"),
        ({"a": (0, 0, 0)}, "width 0"),
    ],
)
def test_layout_rejects_bad_counts(groups, message):
  with pytest.raises(ValueError, match=message):
    MergeLayout(groups)


def test_from_ratios_rejects_bad_ratio_and_unknown_group():
  with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
    MergeLayout.from_ratios({"a": 4}, 1.5)
  with pytest.raises(ValueError, match="unknown groups: \\['z'\\]"):
    MergeLayout.from_ratios({"a": 4}, {"z": 0.5})


def test_layout_is_an_immutable_mapping():
  layout = MergeLayout({"a": (2, 1, 1)})
  assert dict(layout) == {"a": (2, 1, 1)}
  assert layout["a"].width == 4
  with pytest.raises(TypeError):
    layout["a"] = (1, 0, 0)


def test_permutation_spec_checks_groups_against_sizes():
  ref = AxisRef(("params", "Dense_0", "kernel"), 1)
  spec = PermutationSpec({"h": [ref, (("params", "Dense_1", "kernel"), 0)]}, {"h": 8})
  assert spec.groups["h"][1] == AxisRef(("params", "Dense_1", "kernel"), 0, None)
  with pytest.raises(ValueError, match="different groups"):
    PermutationSpec({"h": [ref]}, {"g": 8})
  with pytest.raises(ValueError, match="positive int"):
    PermutationSpec({"h": [ref]}, {"h": 0})
