"""The absl entry point the experiments share: `--config`, `--workdir`, `--distributed`.

    if __name__ == "__main__":
      cli.main(run, about="Re-basin")

Flags are defined only when a script runs as `__main__`, so experiments can
import one another. `--distributed` calls `jax.distributed.initialize()` (no
arguments: TPU pods, SLURM and Open MPI are found by jax) unless jax already
is (experiments/launch_local.py initialises its processes itself). Every
process then builds the same datasets and its statistic passes read
`cli.process_shard(batches)` (`distributed.process_shard`: batch i on process
i % N), so a pass is over all the batches once.
"""

from collections.abc import Callable
from typing import Any

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from experiments import logs
from mergejax.distributed import process_shard  # noqa: F401  the experiments' data, per process


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
  flags.DEFINE_bool(
      "distributed", False,
      "Call jax.distributed.initialize() first (one process per host of a TPU pod slice or GPU cluster;"
      " no-op if already initialised). Each process reads its share of the statistic passes' batches"
      " (README, Many devices and hosts).")
  flags.mark_flags_as_required([n for n, d in (("config", config), ("workdir", workdir)) if d is None])

  def absl_main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_libraries()
    if flags.FLAGS.distributed and not jax.distributed.is_initialized():
      jax.distributed.initialize()
    run(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(absl_main)
