"""BUILD mirrors the package: Bazel is not available here, so this checks it.

BUILD is Starlark, whose simple subset is Python: it is executed with the rule
functions replaced by recorders.
"""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ("py_library", "py_test", "py_binary")


def _targets() -> dict[str, list[dict]]:
  recorded = {rule: [] for rule in RULES}

  def recorder(rule):
    return lambda **kwargs: recorded[rule].append(kwargs)

  scope = {rule: recorder(rule) for rule in RULES}
  scope["load"] = lambda *args: None
  scope["package"] = lambda **kwargs: None
  scope["glob"] = lambda *args, **kwargs: (_ for _ in ()).throw(
      AssertionError("list sources explicitly; glob hides missing targets"))
  exec(compile((ROOT / "BUILD").read_text(), "BUILD", "exec"), scope)  # pylint: disable=exec-used
  return recorded


def _srcs(targets) -> list[str]:
  return [src for t in targets for src in t.get("srcs", [])]


def test_every_module_is_in_a_library_or_binary():
  targets = _targets()
  listed = set(_srcs(targets["py_library"] + targets["py_binary"]))
  modules = {
      str(p.relative_to(ROOT))
      for top in ("mergejax", "experiments")
      for p in (ROOT / top).rglob("*.py")
  }
  missing = sorted(modules - listed)
  assert not missing, f"modules missing from BUILD: {missing}"


def test_every_test_file_has_a_py_test():
  targets = _targets()
  listed = _srcs(targets["py_test"])
  tests = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")}
  missing = sorted(tests - set(listed))
  assert not missing, f"test files without a py_test in BUILD: {missing}"
  names = [t["name"] for t in targets["py_test"]]
  assert len(names) == len(set(names)), "duplicate py_test names"


def test_build_names_no_missing_file():
  targets = _targets()
  stale = sorted(
      src for rule in RULES for src in _srcs(targets[rule]) if not (ROOT / src).is_file()
  )
  assert not stale, f"BUILD lists files that do not exist: {stale}"


def test_library_dependencies_exist():
  targets = _targets()
  names = {f":{t['name']}" for rule in RULES for t in targets[rule]}
  for rule in RULES:
    for t in targets[rule]:
      local = [d for d in t.get("deps", []) if d.startswith(":")]
      unknown = sorted(set(local) - names)
      assert not unknown, f"{t['name']} depends on unknown targets {unknown}"
