"""Logging for the experiments: our progress at INFO, libraries' from WARNING on.

Orbax logs every checkpoint operation at INFO through absl, and JAX logs its
backend probing; at absl's default verbosity that buries the training
progress. Call `quiet_libraries()` in an absl `main`.
"""

import logging as std_logging
import pathlib

from absl import logging

_OURS = tuple(
    str(pathlib.Path(__file__).resolve().parent.parent / d) for d in ("experiments", "mergejax")
)


class OnlyOurInfo(std_logging.Filter):
  """Passes records at WARNING and above, and every record logged by our code."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_OURS)


def quiet_libraries() -> None:
  """Drops other libraries' records below WARNING from absl's handler."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, OnlyOurInfo) for f in handler.filters):
    handler.addFilter(OnlyOurInfo())
