"""The README's tour runs as written, and prints what its comments say."""

import contextlib
import io
import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _python_blocks(text: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def _printed_claims(code: str) -> list[str]:
  """The comment after each `print(...)` line: what the README says it prints."""
  return [m.group(1).strip() for m in re.finditer(r"^[ \t]*print\(.*\)[ \t]+# (.*)$", code, flags=re.MULTILINE)]


def _plain(text: str) -> str:
  return re.sub(r"['\"()]", "", text)


def test_readme_tour_runs_and_prints_what_it_says(tmp_path):
  blocks = _python_blocks((ROOT / "README.md").read_text())
  assert blocks, "README.md has no python example"
  cwd = os.getcwd()
  out = io.StringIO()
  try:
    os.chdir(tmp_path)
    with contextlib.redirect_stdout(out):
      for code in blocks:
        exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
  finally:
    os.chdir(cwd)
  claims = [c for code in blocks for c in _printed_claims(code)]
  assert claims, "the README's examples claim no output; this test checks nothing"
  for claim in claims:
    assert _plain(claim) in _plain(out.getvalue()), f"README claims {claim!r}; printed:\n{out.getvalue()}"
