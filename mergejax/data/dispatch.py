"""Choosing a function by name, with its options checked before it runs.

`load`, `split` and `shift` each pick one function from a table by name and
pass it the caller's keyword options. `bind` checks both against the table and
the function's signature, so a misspelt name or option fails at once with a
`ValueError` that lists what is valid, before any work is done.
"""

from collections.abc import Callable, Mapping
import functools
import inspect
from typing import Any


def bind(
    table: Mapping[str, Callable[..., Any]],
    what: str,
    name: str,
    context: Mapping[str, Any],
    options: Mapping[str, Any],
) -> Callable[..., Any]:
  """`table[name]` with its keyword arguments bound, after checking them.

  Args:
    table: name -> function; each function's options are its keyword-only
      parameters.
    what: what a name in the table is (`"dataset"`, `"split"`), for messages.
    name: the name chosen by the caller.
    context: arguments the library supplies (a seed, a random generator), each
      passed only to a function that has a parameter of that name; they are
      never valid options.
    options: the caller's options.

  Returns:
    `table[name]` with `context` and `options` bound; positional arguments are
    left to the caller.

  Raises:
    ValueError: if `name` is not in `table`, or an option is not a keyword-only
      parameter of `table[name]`.
  """
  if name not in table:
    raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(table)}")
  fn = table[name]
  params = inspect.signature(fn).parameters
  valid = [
      p for p, v in params.items()
      if v.kind is inspect.Parameter.KEYWORD_ONLY and p not in context
  ]
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(
        f"{what} {name!r} has no option(s) {', '.join(unknown)}; valid:"
        f" {', '.join(valid) or 'none'}"
    )
  supplied = {k: v for k, v in context.items() if k in params}
  return functools.partial(fn, **supplied, **options)
