"""experiments.logs: our INFO records pass, other libraries' pass from WARNING on."""

import logging
import pathlib

from experiments import logs

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_only_our_info_passes():
  only_ours = logs.OnlyOurInfo()
  orbax = "/site-packages/orbax/checkpoint/_src/path/atomicity.py"
  assert only_ours.filter(_record(str(ROOT / "experiments" / "train.py"), logging.INFO))
  assert only_ours.filter(_record(str(ROOT / "mergejax" / "io" / "checkpoint.py"), logging.INFO))
  assert not only_ours.filter(_record(orbax, logging.INFO))
  assert only_ours.filter(_record(orbax, logging.WARNING))
  assert only_ours.filter(_record(orbax, logging.ERROR))
