r"""Runs one program as N `jax.distributed` processes on this machine (CPU).

    python -m experiments.launch_local --processes=2 --devices_per_process=4 -- my_merge --flag=1
    python -m experiments.launch_local --timeout_s=120 -- mypackage.mymodule:main arg1 arg2

Each process sees `devices_per_process` CPU devices, uses CPU collectives
(gloo) and calls `jax.distributed.initialize("localhost:PORT",
num_processes=N, process_id=i)` on a free port before the target runs, so
the target sees `jax.process_count() == N` and every process's devices. A
target `module` runs as `python -m module ARGS` would (the experiments'
`--distributed` flag then finds jax initialised and does nothing more); a
target `module:function` is imported and called as `function(*ARGS)`. The
repository root is on the processes' `PYTHONPATH`.

Every process has a wall-clock limit (`--timeout_s`): one that exceeds it is
killed, and once one process fails or is killed the others are killed too,
since they would wait for it in their next collective. A process whose
target raises exits at once with status 1 (or the SystemExit's), printing the
traceback, without jax's shutdown barrier (which would wait for the others). Each process's
output is printed (prefixed `[i]`) when all have ended; the exit status is
non-zero if any failed. `launch()` is the same from Python (the tests use it).
"""

from collections.abc import Sequence
import importlib
import os
import pathlib
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import NamedTuple

from absl import app
from absl import flags
import jax

_REPO = pathlib.Path(__file__).resolve().parents[1]
_WORKER_ENV = "MERGEJAX_LAUNCH_LOCAL"  # "coordinator,processes,process_id,devices"
_WORKER = "from experiments import launch_local; launch_local.worker_main()"


class Finished(NamedTuple):
  """How one process ended.

  Attributes:
    process_id: its `jax.process_index()`.
    returncode: its exit status (negative: killed by that signal).
    output: its stdout and stderr, interleaved.
    timed_out: whether it was killed at the time limit.
    killed: whether it was killed because another process failed or timed out.
  """

  process_id: int
  returncode: int
  output: str
  timed_out: bool = False
  killed: bool = False


def free_port() -> int:
  """A TCP port free on localhost now (the OS's pick)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(target: str, args: Sequence[str] = (), *, processes: int = 2, devices_per_process: int = 1,
           timeout_s: float = 300.0) -> list[Finished]:
  """Runs `target` as `processes` local jax.distributed processes; waits for all.

  Args:
    target: `module` (run as `python -m module args`) or `module:function`
      (called as `function(*args)`); importable from the repository root.
    args: strings passed on.
    processes: how many processes.
    devices_per_process: CPU devices each process sees.
    timeout_s: each process's wall-clock limit, from the launch.

  Returns:
    One `Finished` per process, by process id.

  Raises:
    ValueError: for fewer than 1 process or device, or a target that is not
      `module` or `module:function`.
  """
  if processes < 1 or devices_per_process < 1:
    raise ValueError(f"launch: processes ({processes}) and devices_per_process ({devices_per_process}) must be >= 1")
  if not target or target.count(":") > 1 or target.startswith(":") or target.endswith(":"):
    raise ValueError(f"launch: target must be 'module' or 'module:function', got {target!r}")
  coordinator = f"localhost:{free_port()}"
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
  env["JAX_PLATFORMS"] = "cpu"
  # The device count is set per process (jax_num_cpu_devices); an inherited XLA flag would clash.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  with tempfile.TemporaryDirectory(prefix="launch_local_") as logs:
    outputs = [open(pathlib.Path(logs) / f"{i}.log", "w+b") for i in range(processes)]
    running = []
    for i, out in enumerate(outputs):
      worker_env = {**env, _WORKER_ENV: f"{coordinator},{processes},{i},{devices_per_process}"}
      running.append(subprocess.Popen([sys.executable, "-c", _WORKER, target, *args], env=worker_env,
                                      stdout=out, stderr=subprocess.STDOUT, cwd=_REPO))
    timed_out, killed = _wait(running, time.monotonic() + timeout_s)
    finished = []
    for i, (proc, out) in enumerate(zip(running, outputs)):
      out.seek(0)
      finished.append(Finished(i, proc.returncode, out.read().decode(errors="replace"), i in timed_out,
                               i in killed))
      out.close()
  return finished


def _wait(running: list[subprocess.Popen], deadline: float) -> tuple[set[int], set[int]]:
  """Waits for every process; kills all at the deadline or once one fails.

  Returns: (the processes killed at the deadline, those killed after another failed).
  """
  timed_out, killed = set(), set()
  while None in [p.poll() for p in running]:  # a list: every process polled
    failed = any(p.returncode not in (None, 0) for p in running)
    late = time.monotonic() > deadline
    if failed or late:
      for i, p in enumerate(running):
        if p.poll() is None:
          p.kill()
          (timed_out if late else killed).add(i)
      for p in running:
        p.wait()
      break
    time.sleep(0.05)
  return timed_out, killed


def describe(finished: Sequence[Finished]) -> str:
  """Every process's status and output, prefixed `[i]`."""
  lines = []
  for f in finished:
    status = ("killed at the time limit" if f.timed_out else "killed after another process failed"
              if f.killed else f"exit status {f.returncode}")
    lines.append(f"[{f.process_id}] {status}")
    lines += [f"[{f.process_id}] {line}" for line in f.output.splitlines()]
  return "\n".join(lines)


def worker_main() -> None:
  """A launched process: sets up jax, joins the others, runs the target."""
  coordinator, processes, process_id, devices = os.environ.pop(_WORKER_ENV).split(",")
  jax.config.update("jax_num_cpu_devices", int(devices))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=int(processes), process_id=int(process_id))
  target, *args = sys.argv[1:]
  module, _, function = target.partition(":")
  try:
    if function:
      getattr(importlib.import_module(module), function)(*args)
    else:
      sys.argv = [module, *args]
      runpy.run_module(module, run_name="__main__", alter_sys=True)
  except BaseException as e:  # pylint: disable=broad-exception-caught
    status = (e.code if isinstance(e.code, int) else 1) if isinstance(e, SystemExit) else 1
    if not status:
      return
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: jax's shutdown at exit would wait for the other processes, which may be
    # waiting for this one in a collective. The launcher sees the failure now and ends them.
    os._exit(status)


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2:
    raise SystemExit("usage: python -m experiments.launch_local [flags] -- module[:function] [args...]")
  finished = launch(argv[1], argv[2:], processes=flags.FLAGS.processes,
                    devices_per_process=flags.FLAGS.devices_per_process, timeout_s=flags.FLAGS.timeout_s)
  print(describe(finished))
  if any(f.returncode != 0 for f in finished):
    raise SystemExit(1)


if __name__ == "__main__":
  flags.DEFINE_integer("processes", 2, "Number of processes.")
  flags.DEFINE_integer("devices_per_process", 1, "CPU devices each process sees.")
  flags.DEFINE_float("timeout_s", 600.0, "Wall-clock limit of each process, in seconds.")
  app.run(main)
