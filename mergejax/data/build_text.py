"""Builds the embedded text corpus from this Python's standard library.

    python -m mergejax.data.build_text            # rewrites mergejax/data/text/
    python -m mergejax.data.build_text --out DIR  # writes elsewhere

Reads the source of a fixed list of standard-library modules (`MODULES`, each
a `name.py` or a package directory `name/` with every `.py` under it) from
`sysconfig.get_paths()["stdlib"]`, in sorted path order, and splits each file
in two byte streams:

- **code**: the source with its docstrings (module, class and function
  docstrings, found by `ast`) and comments (found by `tokenize`) removed;
  lines that held only those are dropped, trailing whitespace is stripped, and
  a body left empty by its docstring gets `pass`;
- **prose**: the docstrings (`inspect.cleandoc`-ed) and the comments (runs of
  comment lines joined, `#` and one following space removed; shebangs and
  coding cookies left out), in source order, separated by blank lines.

Files are joined with one blank line. Both streams are UTF-8, gzipped with a
fixed header (mtime 0, level 9), and written as `stdlib_code.txt.gz` and
`stdlib_prose.txt.gz` beside `manifest.json`, which records the Python
version, the modules and files read, and for each output its sha256 (of the
.gz file and of the text) and sizes.

The standard library differs between Python builds (3.11.7's is not
3.12's), so the corpus is built once and shipped; `loaders.stdlib_text`
verifies the shipped files against the manifest and never rebuilds at run
time. This script reproduces the shipped files exactly only on the Python
version the manifest names.
"""

import argparse
import ast
import gzip
import hashlib
import inspect
import io
import json
import pathlib
import re
import sys
import sysconfig
import tokenize

# Pure-Python modules of the standard library, as they exist in 3.11 (a
# package stands for every .py file under its directory).
MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "email", "enum", "fnmatch",
    "fractions", "functools", "getopt", "gettext", "glob", "graphlib", "heapq", "hmac", "json",
    "keyword", "linecache", "logging", "numbers", "operator", "optparse", "pprint", "queue",
    "random", "reprlib", "sched", "secrets", "shlex", "shutil", "statistics", "string",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "types", "typing", "uuid",
    "warnings", "weakref", "zipfile",
)
DOMAINS = ("code", "prose")
TEXT_DIR = pathlib.Path(__file__).resolve().parent / "text"
MANIFEST = "manifest.json"
_COOKIE = re.compile(r"^#.*coding[:=]")


def file_name(domain: str) -> str:
  """The shipped file of `domain`: `stdlib_{domain}.txt.gz`."""
  return f"stdlib_{domain}.txt.gz"


def source_files(stdlib: str | pathlib.Path | None = None) -> list[pathlib.Path]:
  """The .py files of `MODULES` under `stdlib` (default: this Python's), sorted.

  Raises:
    FileNotFoundError: naming a module this standard library does not have.
  """
  root = pathlib.Path(stdlib or sysconfig.get_paths()["stdlib"])
  files = []
  for name in MODULES:
    module, package = root / f"{name}.py", root / name
    if module.is_file():
      files.append(module)
    elif package.is_dir():
      files.extend(p for p in package.rglob("*.py") if "test" not in p.relative_to(root).parts[1:-1])
    else:
      raise FileNotFoundError(f"the standard library at {root} has no module {name!r}")
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstring_nodes(tree: ast.AST) -> list[tuple[ast.Expr, bool]]:
  """Each docstring statement, and whether it is its body's only statement."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
          and isinstance(body[0].value.value, str)):
        out.append((body[0], len(body) == 1 and not isinstance(node, ast.Module)))
  return out


def split_source(source: str) -> tuple[str, str]:
  """One file's `(code, prose)`, as the module docstring describes."""
  lines = source.splitlines()
  # Removals per line (0-based): (start column, end column or None for the
  # line's end, replacement). ast columns are UTF-8 byte offsets.
  cuts: dict[int, list[tuple[int, int | None, str]]] = {}

  def char_col(row: int, byte_col: int) -> int:
    return len(lines[row].encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))

  pieces: list[tuple[tuple[int, int], str]] = []  # ((row, col), prose), sorted later
  tree = ast.parse(source)
  for node, only in _docstring_nodes(tree):
    first, last = node.lineno - 1, node.end_lineno - 1
    start, end = char_col(first, node.col_offset), char_col(last, node.end_col_offset)
    fill = "pass" if only else ""
    if first == last:
      cuts.setdefault(first, []).append((start, end, fill))
    else:
      cuts.setdefault(first, []).append((start, None, fill))
      for row in range(first + 1, last):
        cuts.setdefault(row, []).append((0, None, ""))
      cuts.setdefault(last, []).append((0, end, ""))
    text = inspect.cleandoc(node.value.value).strip()
    if text:
      pieces.append(((first, start), text))
  comment_run: list[str] = []
  run_start, run_row = None, -2
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type != tokenize.COMMENT:
      continue
    row, col = tok.start[0] - 1, tok.start[1]
    cuts.setdefault(row, []).append((col, None, ""))
    if row == 0 and tok.string.startswith("#!") or row < 2 and _COOKIE.match(tok.string):
      continue
    text = tok.string[1:]
    text = text[1:] if text.startswith(" ") else text
    if row != run_row + 1 and comment_run:
      pieces.append((run_start, "\n".join(comment_run).strip()))
      comment_run = []
    if not comment_run:
      run_start = (row, col)
    comment_run.append(text.rstrip())
    run_row = row
  if comment_run:
    pieces.append((run_start, "\n".join(comment_run).strip()))
  code_lines = []
  for row, line in enumerate(lines):
    if row not in cuts:
      code_lines.append(line.rstrip())
      continue
    kept = line
    for start, end, fill in sorted(cuts[row], key=lambda c: -c[0]):
      kept = kept[:start] + fill + (kept[end:] if end is not None else "")
    kept = kept.rstrip()
    if kept.strip():
      code_lines.append(kept)
  code = "\n".join(code_lines).strip("\n") + "\n"
  prose = "\n\n".join(text for _, text in sorted(pieces) if text)
  return code, (prose + "\n" if prose else "")


def build(stdlib: str | pathlib.Path | None = None) -> dict[str, bytes]:
  """`{"code": bytes, "prose": bytes}` of the corpus read from `stdlib`."""
  streams: dict[str, list[str]] = {d: [] for d in DOMAINS}
  for path in source_files(stdlib):
    code, prose = split_source(path.read_text(encoding="utf-8"))
    streams["code"].append(code)
    if prose:
      streams["prose"].append(prose)
  return {d: "\n".join(parts).encode("utf-8") for d, parts in streams.items()}


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def write(out_dir: str | pathlib.Path = TEXT_DIR, stdlib: str | pathlib.Path | None = None) -> dict:
  """Builds the corpus and writes the .gz files and `manifest.json` to `out_dir`.

  Returns:
    The manifest written.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  root = pathlib.Path(stdlib or sysconfig.get_paths()["stdlib"])
  texts = build(root)
  manifest = {
      "python": "{}.{}.{}".format(*sys.version_info[:3]),
      "implementation": sys.implementation.name,
      "modules": list(MODULES),
      "source_files": [p.relative_to(root).as_posix() for p in source_files(root)],
      "files": {},
  }
  for domain, text in texts.items():
    packed = gzip.compress(text, compresslevel=9, mtime=0)
    (out_dir / file_name(domain)).write_bytes(packed)
    manifest["files"][domain] = {
        "name": file_name(domain), "sha256": _sha256(packed), "text_sha256": _sha256(text),
        "bytes": len(text), "gzip_bytes": len(packed),
    }
  (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
  return manifest


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(TEXT_DIR), help="output directory")
  args = parser.parse_args(argv)
  manifest = write(args.out)
  for domain, entry in manifest["files"].items():
    print(f"{domain}: {entry['bytes']} bytes, {entry['gzip_bytes']} gzipped, sha256 {entry['sha256']}")


if __name__ == "__main__":
  main()
