"""What the processes of a multi-process run agree on before a data pass.

Under `jax.distributed` every process runs the same program on its own
shard of the data. A statistic over all of it needs the processes to agree on
host-side facts (how many batches, how many rows, which shapes) through a
small collective on host integers, and to raise the same error together
rather than leave the others waiting in their next collective. A mesh is
"local" when all its devices belong to this process (nothing is exchanged:
each process computes on its own) and "global" when it holds devices of every
process.

    mesh = distributed.default_mesh()               # every device of every process
    table = distributed.gather_ints(mesh, [rows])    # int64[processes, 1], the same everywhere
    distributed.raise_together(mesh, error, "fisher")
    batches = distributed.process_shard(dataset_batches)  # each process's share of the same batches
    example, batches = distributed.peek_any_process(mesh, peek, batches, "regmean_grams")  # zeros if no batch here
"""

import ast
from collections.abc import Callable, Iterable, Sequence
import itertools
from typing import Any
import zlib

import jax
from jax.experimental import multihost_utils
import numpy as np

PyTree = Any


def default_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh named "data" over every device of every process (`jax.devices()`)."""
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def mesh_processes(mesh: jax.sharding.Mesh) -> tuple[int, ...]:
  """The process indices holding the mesh's devices, sorted.

  Raises:
    ValueError: when this process holds none of them, or the mesh spans
      several processes but not all (a pass over it would wait for processes
      that never join).
  """
  processes = tuple(sorted({d.process_index for d in mesh.devices.flat}))
  if jax.process_index() not in processes:
    raise ValueError(
        f"mesh: process {jax.process_index()} holds none of the mesh's devices (it spans processes"
        f" {list(processes)})")
  if 1 < len(processes) < jax.process_count():
    raise ValueError(
        f"mesh: spans processes {list(processes)} of {jax.process_count()}; a mesh must hold devices of"
        " one process (a local pass) or of every process")
  return processes


def is_global(mesh: jax.sharding.Mesh) -> bool:
  """Whether the mesh holds devices of several processes (of all: `mesh_processes`)."""
  return len(mesh_processes(mesh)) > 1


def gather_ints(mesh: jax.sharding.Mesh, values: Sequence[int]) -> np.ndarray:
  """Every process's `values`, as int64[processes, len(values)], row p from process p.

  On a local mesh, just `[values]` (nothing is exchanged). On a global mesh
  every process must call it with as many values, in the same order of calls.
  """
  local = np.asarray(values, np.int64).reshape(1, -1)
  if not is_global(mesh):
    return local
  return np.asarray(multihost_utils.process_allgather(local[0])).reshape(jax.process_count(), -1)


def shared_example(mesh: jax.sharding.Mesh, arrays: Sequence[np.ndarray] | None,
                   rows: int = 1) -> tuple[np.ndarray, ...] | None:
  """`arrays` as a tuple where this process has them, else zeros shaped like another's.

  For a process with no data (no batch at all) that must still take part in
  a pass: it gets zero arrays of `rows` rows, with the shapes past the first
  axis and the dtypes of the first process that has arrays. None when no
  process has any. On a global mesh every process must call it (two
  exchanges of host ints; one when every process or none has arrays).
  """
  mine = None if arrays is None else tuple(np.asarray(a) for a in arrays)
  if not is_global(mesh):
    return mine
  code = b"" if mine is None else repr([(a.shape[1:], a.dtype.name) for a in mine]).encode()
  lengths = gather_ints(mesh, [len(code)])[:, 0]
  if lengths.all() or not lengths.any():
    return mine
  source = int(np.flatnonzero(lengths)[0])
  padded = np.zeros(lengths.max(), np.int64)
  padded[:len(code)] = np.frombuffer(code, np.uint8)
  described = gather_ints(mesh, padded)[source, :lengths[source]].astype(np.uint8).tobytes()
  if mine is not None:
    return mine
  return tuple(np.zeros((rows, *shape), jax.numpy.dtype(dtype))
               for shape, dtype in ast.literal_eval(described.decode()))


def peek_any_process(mesh: jax.sharding.Mesh | None, peek: Callable[[Any], tuple[Any, Any]], batches: Any,
                     what: str) -> tuple[Any, Any]:
  """`peek(batches)` (the first input, and batches to read from the start),
  where on a global mesh (None: `default_mesh()`) a process with no batches
  (`peek` raised ValueError) gets a zero example of one row shaped like
  another process's first input (an array; `shared_example`) and no batches,
  so it can trace the model and take part in the pass with masked batches.
  Every process of a global mesh must call it.

  Raises:
    ValueError: `peek`'s on a local mesh; on every process when no process
      has a batch (naming `what`).
  """
  mesh = default_mesh() if mesh is None else mesh
  if not is_global(mesh):
    return peek(batches)
  try:
    example, batches = peek(batches)
  except ValueError:
    example, batches = None, ()
  shared = shared_example(mesh, None if example is None else (np.asarray(example),))
  if shared is None:
    raise ValueError(f"{what}: batches is empty on every process")
  return (shared[0] if example is None else example), batches


def process_shard(batches: Iterable[Any] | Callable[[], Iterable[Any]]) -> Any:
  """This process's share of `batches`: batch i goes to process `i % jax.process_count()`.

  For data every process can enumerate in the same order (a dataset's
  batches, read or generated deterministically): each process keeps its own
  batches, so a pass over them (`stats.accumulate`, a global mesh) is one
  pass over all the batches. A callable (a fresh iterable per call, as PLeaS
  and RegMean++ take) gives a callable, a sequence a slice of it, another
  iterable an iterator; with one process `batches` comes back as it is.
  A process may get none (fewer batches than processes): it passes masked
  batches (`stats.accumulate`).
  """
  count, me = jax.process_count(), jax.process_index()
  if count == 1:
    return batches
  if callable(batches):
    return lambda: itertools.islice(batches(), me, None, count)
  if isinstance(batches, Sequence):
    return batches[me::count]
  return itertools.islice(batches, me, None, count)


def raise_together(mesh: jax.sharding.Mesh, error: Exception | None, what: str) -> None:
  """Raises on every process of a global mesh if any process has an error.

  The process with the error raises it; the others raise a ValueError naming
  it. On a local mesh `error` is raised, if any. Call it where a check that
  depends on a process's own data may fail on some processes only.
  """
  failed = gather_ints(mesh, [error is not None])[:, 0]
  if error is not None:
    raise error
  if failed.any():
    raise ValueError(f"{what}: process(es) {np.flatnonzero(failed).tolist()} failed (see their logs)")


def fingerprint(tree: PyTree) -> int:
  """A CRC-32 of every leaf's shape, dtype and bytes (host copies), in flattening order.

  Leaves that are global arrays (not fully addressable) are skipped: jax
  keeps them consistent across processes.
  """
  crc = 0
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      continue
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(f"{a.shape}{a.dtype.str}".encode(), crc)
    crc = zlib.crc32(a.view(np.uint8).reshape(-1), crc)
  return crc


def replicate(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Every leaf replicated over `mesh` (each process passes the same values).

  Global arrays are resharded; other leaves are copied from this process's
  host copy, with no check that the processes agree (`fingerprint` checks).
  PRNG key arrays keep their implementation.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if not is_global(mesh):
    return jax.device_put(tree, replicated)

  def leaf_replicated(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return jax.device_put(leaf, replicated)
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      data = np.asarray(jax.random.key_data(leaf))
      return jax.random.wrap_key_data(jax.make_array_from_process_local_data(replicated, data, data.shape),
                                      impl=jax.random.key_impl(leaf))
    a = np.asarray(leaf)
    return jax.make_array_from_process_local_data(replicated, a, a.shape)

  return jax.tree.map(leaf_replicated, tree)


def local_copy(tree: PyTree) -> PyTree:
  """Each replicated leaf's copy on this process's first local device."""
  device = jax.local_devices()[0]
  return jax.tree.map(lambda a: jax.device_put(a.addressable_data(0), device), tree)
