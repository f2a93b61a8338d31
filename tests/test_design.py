"""DESIGN.md and the README stay true to the code.

DESIGN.md's "Public API" section lists every name `mergejax` and
`mergejax.merge` export (as `mj.<name>` and `mj.merge.<name>` in its code
block), and only names that exist: a rename that forgets the document fails
here. Its "Layout" section names every module, and the README's "Layout"
section every directory of the repository and every module group of
`mergejax/`.
"""

import fnmatch
import inspect
import pathlib
import re

import mergejax as mj

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _section(text: str, heading: str) -> str:
  """The text under `## heading`, up to the next `## ` heading."""
  match = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
  assert match, f"no '## {heading}' section"
  return match.group(1)


def _code(section: str) -> str:
  blocks = re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.DOTALL)
  assert blocks, "the section has no code block"
  return "\n".join(blocks)


def _listed(design: str) -> set[tuple[str, ...]]:
  """Every dotted name after `mj.` in the Public API section's code: ("merge", "ties"), ..."""
  code = _code(_section(design, "Public API"))
  return {tuple(m.split(".")[1:]) for m in re.findall(r"\bmj((?:\.[A-Za-z_]\w*)+)", code)}


def _public(module) -> set[str]:
  """A module's public names that are not modules (submodules are listed elsewhere)."""
  return {n for n, v in vars(module).items() if not n.startswith("_") and not inspect.ismodule(v)}


def _unresolved(listed: set[tuple[str, ...]]) -> list[str]:
  missing = []
  for dotted in sorted(listed):
    obj = mj
    for part in dotted:
      if not hasattr(obj, part):
        missing.append("mj." + ".".join(dotted))
        break
      obj = getattr(obj, part)
  return missing


def _unlisted(listed: set[tuple[str, ...]]) -> list[str]:
  top = {d[0] for d in listed}
  merge = {d[1] for d in listed if len(d) > 1 and d[0] == "merge"}
  return sorted([f"mj.{n}" for n in _public(mj) - top] + [f"mj.merge.{n}" for n in _public(mj.merge) - merge])


def _design() -> str:
  return (ROOT / "DESIGN.md").read_text()


def test_every_name_the_design_lists_exists():
  missing = _unresolved(_listed(_design()))
  assert not missing, f"DESIGN.md's Public API lists names mergejax does not have: {missing}"


def test_every_exported_name_is_in_the_design():
  unlisted = _unlisted(_listed(_design()))
  assert not unlisted, f"exported but missing from DESIGN.md's Public API: {unlisted}"


def test_the_checks_notice_a_removed_or_renamed_name():
  design = _design()
  assert "mj.merge.ties(" in design and "mj.weight_matching(" in design
  removed = re.sub(r"^mj\.merge\.ties\(.*\n", "", design, flags=re.MULTILINE)
  assert "mj.merge.ties" in _unlisted(_listed(removed))
  renamed = design.replace("mj.weight_matching(", "mj.weight_match(")
  assert "mj.weight_matching" in _unlisted(_listed(renamed))
  assert "mj.weight_match" in _unresolved(_listed(renamed))


def _ignored() -> list[str]:
  """The .gitignore patterns (generated files), without trailing slashes."""
  lines = (ROOT / ".gitignore").read_text().splitlines()
  return [l.strip().rstrip("/") for l in lines if l.strip() and not l.startswith("#")]


def _kept(path: pathlib.Path) -> bool:
  return not path.name.startswith(".") and not any(fnmatch.fnmatch(path.name, p) for p in _ignored())


def _named(text: str, name: str) -> bool:
  return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", text) is not None


def test_the_design_layout_names_every_module():
  layout = _code(_section(_design(), "Layout"))
  modules = sorted(
      p.relative_to(ROOT / "mergejax") for p in (ROOT / "mergejax").rglob("*.py")
      if p.name != "__init__.py" and all(_kept(q) for q in p.relative_to(ROOT).parents if q.name))
  missing = [str(m) for m in modules if not _named(layout, m.name)]
  assert not missing, f"modules missing from DESIGN.md's Layout: {missing}"
  dirs = [p.name + "/" for p in (ROOT / "mergejax").iterdir() if p.is_dir() and _kept(p)]
  assert all(d in layout for d in dirs), f"DESIGN.md's Layout should name {dirs}"


def test_the_readme_layout_lists_every_directory_and_module_group():
  layout = _code(_section((ROOT / "README.md").read_text(), "Layout"))
  top = sorted(p.name + "/" for p in ROOT.iterdir() if p.is_dir() and _kept(p))
  groups = sorted(
      str(p.relative_to(ROOT / "mergejax")) + "/" for p in (ROOT / "mergejax").rglob("*")
      if p.is_dir() and all(_kept(q) for q in p.relative_to(ROOT).parents if q.name) and _kept(p))
  modules = sorted(p.name for p in (ROOT / "mergejax").glob("*.py"))
  missing = [n for n in top + groups if n not in layout] + [m for m in modules if not _named(layout, m)]
  assert not missing, f"README.md's Layout misses: {missing}"
  for name in ("DESIGN.md", "CONTRIBUTING.md"):
    assert name in layout
