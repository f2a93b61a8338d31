"""Name maps: a state dict's tensors onto the variables of a user's own Flax module, and back.

A `NameMap` is an ordered list of rules `(pattern, path, transform)`:
`pattern` is a regular expression that must match a whole tensor name, its
named groups fill the `{name}` fields of `path`, the variables leaf path
(`params/Dense_0/kernel`, as `mj.tree.path_str` writes it), and `transform`
says how the tensor's layout becomes the leaf's (`TRANSFORMS`: "T" for a
torch Linear's `(out, in)` weight -> a Dense kernel `(in, out)`,
"oihw_to_hwio" for a 2-D convolution, "oiw_to_wio" for a 1-D one, or a
`Transform(forward, inverse)` of your own). The first rule that matches a
name wins.

    name_map = mj.io.NameMap([
        (r"layers\\.(?P<i>\\d+)\\.weight", "params/Dense_{i}/kernel", "T"),
        (r"layers\\.(?P<i>\\d+)\\.bias", "params/Dense_{i}/bias"),
        (r"conv\\.weight", "params/Conv_0/kernel", "oihw_to_hwio"),
    ])
    like = jax.eval_shape(model.init, key, x)
    report = name_map.match(state, like)             # names, shapes, dtypes: nothing read
    variables = name_map.to_variables(state, like)   # ValueError listing what does not fit
    state_back = name_map.from_variables(variables)  # {tensor name: np.ndarray}, the inverse

Everything is checked from names, shapes and dtypes before any tensor is
read (a lazy `StateDict`'s entries are read one at a time afterwards): keys
no rule maps (or that map to a leaf `like` lacks), leaves no key maps to,
two keys on one leaf, a shape that does not fit after the transform, and a
dtype that differs from the target's (cast only with `cast=True`, and only
within a kind: float <-> float, int -> float; never float -> int).

The inverse needs each rule's pattern to be literal text and named groups
(`\\.` for a dot), so the tensor name can be written back from the groups.
"""

from collections.abc import Callable, Mapping, Sequence
import re
from typing import Any, NamedTuple

import jax
import numpy as np

from mergejax import tree as mt

PyTree = Any


class Transform(NamedTuple):
  """A layout change: `forward` (state dict -> variables) and its `inverse`."""

  forward: Callable[[Any], Any]
  inverse: Callable[[Any], Any]


TRANSFORMS = {
    "T": Transform(lambda x: x.T, lambda x: x.T),
    "oihw_to_hwio": Transform(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),
    "oiw_to_wio": Transform(lambda x: x.transpose(2, 1, 0), lambda x: x.transpose(2, 1, 0)),
}
_IDENTITY = Transform(lambda x: x, lambda x: x)


class Rule(NamedTuple):
  """One rule: tensor names fully matching `pattern` -> the leaf `path`, through `transform`."""

  pattern: str
  path: str
  transform: str | Transform | None = None


class Report(NamedTuple):
  """What a `NameMap` makes of a state dict and a target, from names, shapes and dtypes.

  Attributes:
    pairs: `{tensor name: leaf path}` of every matched tensor, in the state dict's order.
    unmatched_keys: tensor names no rule maps to a leaf of the target (with the
      path a rule gave, where one did).
    unmatched_paths: target leaf paths no tensor maps to.
    problems: what can never be converted: two tensors on one leaf, a shape
      that does not fit after the transform, a dtype that cannot be cast (or
      differs, without `cast=True`).
  """

  pairs: dict[str, str]
  unmatched_keys: list[str]
  unmatched_paths: list[str]
  problems: list[str]

  def describe(self) -> str:
    """The unmatched keys and paths and the problems, one kind a line ('' when none)."""
    lines = [f"problems: {'; '.join(self.problems)}"] if self.problems else []
    if self.unmatched_keys:
      lines.append(f"tensors no rule maps to a target leaf: {self.unmatched_keys}")
    if self.unmatched_paths:
      lines.append(f"target leaves no tensor maps to: {self.unmatched_paths}")
    return "\n".join(lines)


def _key_template(pattern: str) -> str | None:
  """`pattern` as a format string over its named groups, or None if it has other regex syntax.

  `layers\\.(?P<i>\\d+)\\.weight` -> `layers.{i}.weight`.
  """
  out, i = [], 0
  while i < len(pattern):
    c = pattern[i]
    if c == "\\":
      if i + 1 == len(pattern) or pattern[i + 1].isalnum():
        return None
      out.append(pattern[i + 1].replace("{", "{{").replace("}", "}}"))
      i += 2
    elif pattern.startswith("(?P<", i):
      name_end = pattern.index(">", i)
      depth, j = 1, name_end + 1
      while depth:
        if j == len(pattern):
          return None
        depth += {"(": 1, ")": -1}.get(pattern[j], 0)
        j += 2 if pattern[j] == "\\" else 1
      out.append("{" + pattern[i + 4:name_end] + "}")
      i = j
    elif c in ".^$*+?{}[]|()":
      return None
    else:
      out.append(c)
      i += 1
  return "".join(out)


def _fields(template: str) -> list[str]:
  return re.findall(r"\{(\w+)\}", template)


class _CompiledRule(NamedTuple):
  index: int
  rule: Rule
  regex: re.Pattern[str]
  path_regex: re.Pattern[str]
  transform: Transform
  key_template: str | None


def _compile(index: int, rule: Rule | Sequence[Any]) -> _CompiledRule:
  rule = Rule(*rule)
  where = f"rule {index} {tuple(rule)}"
  try:
    regex = re.compile(rule.pattern)
  except re.error as e:
    raise ValueError(f"{where}: pattern is not a regular expression ({e})") from e
  missing = [f for f in _fields(rule.path) if f not in regex.groupindex]
  if missing:
    raise ValueError(f"{where}: path fields {missing} are not named groups of the pattern")
  if rule.transform is None:
    transform = _IDENTITY
  elif isinstance(rule.transform, Transform):
    transform = rule.transform
  elif rule.transform in TRANSFORMS:
    transform = TRANSFORMS[rule.transform]
  else:
    raise ValueError(f"{where}: unknown transform {rule.transform!r}; expected one of"
                     f" {sorted(TRANSFORMS)}, a Transform or None")
  parts = re.split(r"\{(\w+)\}", rule.path)
  path_regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>[^/]+)" for k, p in enumerate(parts))
  return _CompiledRule(index, rule, regex, re.compile(path_regex), transform, _key_template(rule.pattern))


def _cast_problem(key: str, path: str, source: np.dtype, target: np.dtype, cast: bool) -> str | None:
  if source == target:
    return None
  if not np.can_cast(source, target, casting="same_kind"):
    return f"{key} -> {path}: dtype {source} cannot be cast to the target's {target}"
  if not cast:
    return f"{key} -> {path}: dtype {source}, the target's is {target} (pass cast=True to cast)"
  return None


class NameMap:
  """Ordered rules from a state dict's tensor names to a variables tree's leaf paths.

  Args:
    rules: `Rule`s or tuples `(pattern, path)` / `(pattern, path, transform)`;
      the first rule whose pattern fully matches a name maps it.

  Raises:
    ValueError: a pattern that is not a regex, a path field that is not a
      named group of its pattern, an unknown transform (naming the rule).
  """

  def __init__(self, rules: Sequence[Rule | Sequence[Any]]):
    self.rules = [_compile(i, rule) for i, rule in enumerate(rules)]

  def path_of(self, key: str) -> tuple[str, _CompiledRule] | None:
    """`(leaf path, rule)` of the first rule that fully matches `key`; None if none does."""
    for rule in self.rules:
      match = rule.regex.fullmatch(key)
      if match:
        return rule.rule.path.format(**match.groupdict()), rule
    return None

  def match(self, state: Mapping[str, Any], like: PyTree, *, cast: bool = False) -> Report:
    """The report of mapping `state` onto `like`, from names, shapes and dtypes only.

    Args:
      state: tensor name -> array or `LazyTensor` (anything with shape and dtype).
      like: the target variables: arrays or `jax.ShapeDtypeStruct`s (e.g.
        `jax.eval_shape(model.init, key, x)`).
      cast: whether a dtype that differs from the target's (within a kind) is
        to be cast (else it is a problem).
    """
    targets = {mt.path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(like)[0]}
    pairs, unmatched_keys, problems, claimed = {}, [], [], {}
    for key, value in state.items():
      found = self.path_of(key)
      if found is None:
        unmatched_keys.append(key)
        continue
      path, rule = found
      if path not in targets:
        unmatched_keys.append(f"{key} (-> {path}, not in the target)")
        continue
      if path in claimed:
        problems.append(f"{claimed[path]} and {key} both map to {path}")
        continue
      claimed[path] = key
      pairs[key] = path
      source = jax.ShapeDtypeStruct(tuple(value.shape), np.dtype(value.dtype))
      target = targets[path]
      try:
        shape = jax.eval_shape(rule.transform.forward, source).shape
      except (ValueError, TypeError) as e:
        problems.append(f"{key} -> {path}: transform of rule {rule.index} fails on {source.shape} ({e})")
        continue
      if tuple(shape) != tuple(np.shape(target)):
        problems.append(f"{key} -> {path}: shape {source.shape} (after the transform {tuple(shape)})"
                        f" does not fit the target's {tuple(np.shape(target))}")
      problem = _cast_problem(key, path, source.dtype, np.dtype(target.dtype), cast)
      if problem:
        problems.append(problem)
    unmatched_paths = [p for p in targets if p not in claimed]
    return Report(pairs, unmatched_keys, unmatched_paths, problems)

  def to_variables(
      self, state: Mapping[str, Any], like: PyTree, *, allow_unmatched: bool = False, cast: bool = False
  ) -> PyTree:
    """`state`'s tensors as a variables tree of `like`'s structure (NumPy leaves).

    Args:
      state: tensor name -> array or `LazyTensor` (read one at a time, after
        every check).
      like: the target: arrays or `jax.ShapeDtypeStruct`s.
      allow_unmatched: leave tensors no rule maps unread, and take leaves no
        tensor maps to from `like` (which must then hold arrays there, e.g. a
        freshly initialised head). False: they are an error.
      cast: cast a tensor whose dtype differs from the target's (within a kind).

    Raises:
      ValueError: listing every problem and (unless allowed) every unmatched
        key and path, before any tensor is read.
    """
    report = self.match(state, like, cast=cast)
    unfilled = set(report.unmatched_paths)
    errors = list(report.problems)
    if not allow_unmatched and (report.unmatched_keys or unfilled):
      errors.append(report.describe())
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    if allow_unmatched:
      no_value = [mt.path_str(p) for p, leaf in flat
                  if mt.path_str(p) in unfilled and not isinstance(leaf, (np.ndarray, jax.Array))]
      if no_value:
        errors.append(f"target leaves no tensor maps to and `like` holds no array for: {no_value}")
    if errors:
      raise ValueError("the name map does not fit the state dict onto the target:\n" + "\n".join(errors))
    by_path = {path: key for key, path in report.pairs.items()}
    leaves = []
    for path, leaf in flat:
      name = mt.path_str(path)
      if name not in by_path:
        leaves.append(leaf)
        continue
      _, rule = self.path_of(by_path[name])
      x = rule.transform.forward(np.asarray(state[by_path[name]]))
      leaves.append(np.ascontiguousarray(x).astype(np.dtype(leaf.dtype), copy=False))
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def from_variables(self, variables: PyTree, *, allow_unmatched: bool = False) -> dict[str, np.ndarray]:
    """The inverse: `{tensor name: np.ndarray}` in the state dict's names and layouts.

    Each leaf goes through the first rule whose path template matches its
    path; the name is the rule's pattern filled with the path's fields, and
    must map back to the same leaf (an earlier rule that catches it is an
    error: the map would not round-trip).

    Args:
      variables: the variables tree.
      allow_unmatched: skip leaves no rule's path matches (else an error).

    Raises:
      ValueError: a leaf no rule matches (unless allowed), a rule whose
        pattern is not literal text and named groups, or a name that would
        not map back to its leaf, naming each.
    """
    out, unmatched = {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
      name = mt.path_str(path)
      rule, match = next(((r, r.path_regex.fullmatch(name)) for r in self.rules
                          if r.path_regex.fullmatch(name)), (None, None))
      if rule is None:
        unmatched.append(name)
        continue
      if rule.key_template is None or set(_fields(rule.key_template)) - set(match.groupdict()):
        raise ValueError(f"rule {rule.index} {tuple(rule.rule)}: its pattern cannot be written back from"
                         f" {name} (the inverse needs literal text and named groups that the path uses)")
      key = rule.key_template.format(**match.groupdict())
      back = self.path_of(key)
      if back is None or back[0] != name:
        raise ValueError(f"{name} -> {key} by rule {rule.index}, but {key} maps to"
                         f" {None if back is None else back[0]}: the name map does not round-trip")
      if key in out:
        raise ValueError(f"{name}: two leaves give the tensor name {key}")
      out[key] = np.ascontiguousarray(rule.transform.inverse(np.asarray(leaf)))
    if unmatched and not allow_unmatched:
      raise ValueError(f"variables leaves no rule's path matches: {unmatched}")
    return out
