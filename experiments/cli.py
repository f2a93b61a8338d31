"""The absl entry point the experiments share: `--config` and `--workdir`.

    if __name__ == "__main__":
      cli.main(run, about="Re-basin")

Flags are defined only when a script runs as `__main__`, so experiments can
import one another.
"""

from collections.abc import Callable
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import logs


def main(
    run: Callable[[Any, str], Any], *, about: str, config: str | None = None,
    workdir: str | None = None,
) -> None:
  """Defines the flags and runs `run(config, workdir)` under `app.run`.

  Args:
    run: the experiment, `run(config, workdir)`.
    about: what the config configures, for `--help`.
    config: the default config file (None: the flag is required).
    workdir: the default work directory (None: the flag is required).
  """
  config_flags.DEFINE_config_file("config", config, f"{about} config file.", lock_config=True)
  flags.DEFINE_string("workdir", workdir, "Directory for models and results.")
  flags.mark_flags_as_required([n for n, d in (("config", config), ("workdir", workdir)) if d is None])

  def absl_main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_libraries()
    run(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(absl_main)
