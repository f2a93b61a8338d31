"""Other libraries' state dicts: safetensors and torch files in, safetensors out.

A state dict is a flat mapping from a library's tensor names to arrays.
`read_state_dict` reads one lazily: it parses only the files' headers, and
its values are `LazyTensor`s whose shape and dtype are known at once and
whose data is read when asked (`np.asarray(entry)` or `entry.read()`), so a
check of names and shapes (`convert.check_state`, `NameMap.match`) runs
before any tensor is read, and a merge reads one tensor at a time.

    state = mj.io.read_state_dict("gpt2/model.safetensors")   # or a sharded directory
    state["wte.weight"].shape, state["wte.weight"].dtype       # nothing read yet
    wte = np.asarray(state["wte.weight"])                      # f32[vocab, d], read now
    mj.io.write_safetensors("out/model.safetensors", {"wte.weight": wte})

Safetensors files are parsed here (an 8-byte little-endian header length,
a JSON header of each tensor's dtype, shape and byte range, then the raw
little-endian bytes), so neither torch nor the `safetensors` package is
needed, and bfloat16 and float8 come through `ml_dtypes` as they are.
Torch files (`.pt`, `.bin`, `.pth`) are read with
`torch.load(path, map_location="cpu", weights_only=True)` where torch
imports: mergejax never unpickles code. Dtypes are kept unless `dtype=`
asks for a cast (of the floating tensors only), never cast silently.
"""

from collections.abc import Callable, Iterator, Mapping
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import tempfile
from typing import Any
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np

PathLike = str | os.PathLike[str]

# The safetensors dtype codes and their NumPy (ml_dtypes) dtypes.
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
TORCH_SUFFIXES = (".pt", ".bin", ".pth")
INDEX_SUFFIX = ".safetensors.index.json"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = b"\x80"


class LazyTensor:
  """One tensor of a state dict: its shape and dtype now, its data when read.

  Attributes:
    shape: the tensor's shape.
    dtype: its NumPy dtype (bfloat16 and float8 from ml_dtypes).
    where: what it is, for messages (`"file.safetensors: name"`).
  """

  __slots__ = ("shape", "dtype", "where", "_read")

  def __init__(self, shape: tuple[int, ...], dtype: Any, read: Callable[[], np.ndarray], where: str):
    self.shape = tuple(int(n) for n in shape)
    self.dtype = np.dtype(dtype)
    self.where = where
    self._read = read

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def read(self) -> np.ndarray:
    """The tensor, read now (a new array each call); ValueError if it is not as declared."""
    x = np.asarray(self._read())
    if x.shape != self.shape or x.dtype != self.dtype:
      raise ValueError(f"{self.where}: read {x.shape} {x.dtype}, declared {self.shape} {self.dtype}")
    return x

  def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
    del copy  # read() always makes a new array
    x = self.read()
    return x if dtype is None else x.astype(dtype)

  def __repr__(self) -> str:
    return f"LazyTensor({self.where}, shape={self.shape}, dtype={self.dtype})"


class StateDict(Mapping[str, LazyTensor]):
  """A lazy state dict: tensor name -> `LazyTensor`, in the files' order.

  Attributes:
    source: the file or directory it was read from.
    metadata: the safetensors `__metadata__` (of a sharded checkpoint, its
      index's `metadata`); `{}` for torch files.
  """

  def __init__(self, entries: Mapping[str, LazyTensor], *, source: str, metadata: Mapping[str, Any]):
    self._entries = dict(entries)
    self.source = source
    self.metadata = dict(metadata)

  def __getitem__(self, name: str) -> LazyTensor:
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"{self.source} has no tensor {name!r}") from None

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def arrays(self) -> dict[str, np.ndarray]:
    """Every tensor, read now: `{name: np.ndarray}` (the whole checkpoint in memory)."""
    return {name: entry.read() for name, entry in self._entries.items()}

  def __repr__(self) -> str:
    return f"StateDict({self.source}, {len(self)} tensors)"


def is_floating(dtype: Any) -> bool:
  """Whether `dtype` is a floating dtype, bfloat16 and float8 included."""
  return bool(jnp.issubdtype(np.dtype(dtype), jnp.floating))


def _cast(entries: dict[str, LazyTensor], dtype: Any) -> dict[str, LazyTensor]:
  """The floating entries cast to `dtype` on read; the others as they are."""
  dtype = np.dtype(dtype)
  if not is_floating(dtype):
    raise ValueError(f"dtype={dtype}: only a floating dtype can be asked for (integer and bool"
                     " tensors are kept as they are)")

  def cast(entry: LazyTensor) -> LazyTensor:
    if not is_floating(entry.dtype) or entry.dtype == dtype:
      return entry
    return LazyTensor(entry.shape, dtype, lambda: entry.read().astype(dtype), entry.where)

  return {name: cast(entry) for name, entry in entries.items()}


# --- safetensors -------------------------------------------------------------------------------


def _not_safetensors(path: pathlib.Path, why: str) -> ValueError:
  return ValueError(f"{path} is not a safetensors file: {why}")


def _safetensors_header(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, str], int]:
  """`(tensors, metadata, data start)` of a safetensors file, every entry checked.

  `tensors` maps each name to its header entry (dtype, shape, data_offsets),
  in the order of its data; data start is the byte where the data begins.
  """
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    length = int.from_bytes(head, "little")
    raw = f.read(length) if len(head) == 8 and length <= size - 8 else b""

  def refuse(why: str) -> ValueError:  # what the file is instead, where its first bytes say it
    if head.startswith(_ZIP_MAGIC):
      why = "it is a zip archive (a torch checkpoint? read it as .pt/.bin)"
    elif head.startswith(_PICKLE_PROTOCOL) and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
      why = "it is a pickle (a torch checkpoint? read it as .pt/.bin)"
    return _not_safetensors(path, why)

  if len(head) < 8:
    raise refuse(f"{size} bytes, too short for the 8-byte header length")
  if length > size - 8:
    raise refuse(f"the header length is {length} bytes but {size - 8} follow (truncated?)")
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise refuse(f"its header is not JSON ({e})") from e
  if not isinstance(header, dict):
    raise refuse("its header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise _not_safetensors(path, "its __metadata__ is not a map of strings to strings")
  data_size = size - 8 - length
  for name, info in header.items():
    _check_entry(path, name, info, data_size)
  tensors = dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]))
  return tensors, metadata, 8 + length


def _check_entry(path: pathlib.Path, name: str, info: Any, data_size: int) -> None:
  """Raises ValueError naming the file and tensor if its header entry is malformed."""
  where = f"{path}: tensor {name!r}"
  if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
    raise ValueError(f"{where}: a header entry needs exactly dtype, shape and data_offsets, got {info}")
  if info["dtype"] not in SAFETENSORS_DTYPES:
    raise ValueError(f"{where}: dtype {info['dtype']!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
  shape, offsets = info["shape"], info["data_offsets"]
  if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
    raise ValueError(f"{where}: shape {shape} is not a list of sizes")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
          and 0 <= offsets[0] <= offsets[1] <= data_size):
    raise ValueError(f"{where}: data_offsets {offsets} are not a byte range within the file's"
                     f" {data_size} bytes of data (truncated?)")
  nbytes = math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
  if offsets[1] - offsets[0] != nbytes:
    raise ValueError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes; shape"
                     f" {shape} of {info['dtype']} needs {nbytes}")


def _read_bytes(path: pathlib.Path, start: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
  buffer = bytearray(nbytes)
  with open(path, "rb") as f:
    f.seek(start)
    if f.readinto(buffer) != nbytes:
      raise ValueError(f"{path}: ended before byte {start + nbytes} (truncated?)")
  return np.frombuffer(buffer, dtype).reshape(shape)


def _safetensors_entries(path: pathlib.Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
  tensors, metadata, start = _safetensors_header(path)
  entries = {}
  for name, info in tensors.items():
    dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
    begin, end = info["data_offsets"]
    read = lambda b=start + begin, n=end - begin, d=dtype, s=shape: _read_bytes(path, b, n, d, s)
    entries[name] = LazyTensor(shape, dtype, read, f"{path}: {name}")
  return entries, metadata


def _sharded_entries(index: pathlib.Path) -> tuple[dict[str, LazyTensor], dict[str, Any]]:
  """The tensors of a sharded checkpoint, its index and every shard's header checked."""
  try:
    content = json.loads(index.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{index} is not a safetensors index: not JSON ({e})") from e
  weight_map = content.get("weight_map") if isinstance(content, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ValueError(f"{index} is not a safetensors index: no weight_map of tensor name -> file")
  shards = {}
  for name, file in weight_map.items():
    shard = index.parent / file
    if file not in shards:
      if not shard.is_file():
        raise FileNotFoundError(f"{index}: tensor {name!r} is in {file}, which does not exist")
      shards[file] = _safetensors_entries(shard)[0]
    if name not in shards[file]:
      raise ValueError(f"{index}: tensor {name!r} is not in {shard}, where the index puts it")
  entries = {}
  for file, shard_entries in shards.items():
    extra = sorted(set(shard_entries) - {n for n, f in weight_map.items() if f == file})
    if extra:
      raise ValueError(f"{index}: {index.parent / file} holds tensors the index does not put there: {extra}")
    entries.update(shard_entries)
  return entries, dict(content.get("metadata") or {})


def _directory_source(path: pathlib.Path) -> pathlib.Path:
  """The index (or the single safetensors file) of a checkpoint directory."""
  indices = sorted(path.glob("*" + INDEX_SUFFIX))
  if len(indices) > 1:
    raise ValueError(f"{path} holds several safetensors indices {[p.name for p in indices]}; pass one")
  if indices:
    return indices[0]
  files = sorted(path.glob("*.safetensors"))
  if len(files) != 1:
    what = "no safetensors file" if not files else f"several safetensors files {[p.name for p in files]}"
    raise ValueError(f"{path} holds {what} and no *{INDEX_SUFFIX}; pass a file or an index")
  return files[0]


# --- torch -------------------------------------------------------------------------------------


def _torch_to_numpy(t: Any, dtype: np.dtype) -> np.ndarray:
  """A CPU torch tensor as a new NumPy array of `dtype` (bfloat16, float8 through their bits)."""
  t = t.detach().contiguous()
  if dtype.kind != "V":
    return np.array(t.numpy())
  import torch  # pylint: disable=g-import-not-at-top

  bits = {1: torch.uint8, 2: torch.int16}[dtype.itemsize]
  return np.array(t.view(bits).numpy()).view(dtype)


def _torch_dtype(t: Any, where: str) -> np.dtype:
  """The NumPy (or ml_dtypes) dtype of a torch tensor's dtype."""
  name = str(t.dtype).removeprefix("torch.")
  for module in (ml_dtypes, np):
    if isinstance(getattr(module, name, None), type):
      return np.dtype(getattr(module, name))
  raise ValueError(f"{where}: torch dtype {t.dtype} has no NumPy counterpart")


def _torch_entries(path: pathlib.Path, entry: str | None) -> dict[str, LazyTensor]:
  """A torch state dict file's tensors, loaded with weights_only=True (memory-mapped if zip)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading {path} needs torch (pip install 'mergejax[torch]'), which does not import here;"
        " mergejax reads safetensors without it") from e
  with open(path, "rb") as f:
    head = f.read(4)
  is_zip = head.startswith(_ZIP_MAGIC)
  if not is_zip and not head.startswith(_PICKLE_PROTOCOL):
    raise ValueError(f"{path} is not a torch checkpoint: neither a zip archive nor a pickle"
                     " (a safetensors file? name it .safetensors)")
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip and zipfile.is_zipfile(path))
  except pickle.UnpicklingError as e:
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    what = f"it pickles {refused.group(1)}" if refused else "it holds more than tensors"
    raise ValueError(
        f"{path} cannot be loaded with torch.load(weights_only=True): {what}."
        " mergejax never unpickles code; save its state dict"
        " (torch.save(model.state_dict(), ...)) or write it as safetensors") from e
  except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable torch checkpoint: {e}") from e
  if entry is not None:
    if not isinstance(loaded, Mapping) or entry not in loaded:
      keys = sorted(loaded) if isinstance(loaded, Mapping) else type(loaded).__name__
      raise ValueError(f"{path} has no entry {entry!r}; it holds {keys}")
    loaded = loaded[entry]
  if not isinstance(loaded, Mapping):
    raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict (name -> tensor)")
  entries = {}
  for name, t in loaded.items():
    where = f"{path}: {name}"
    if not isinstance(t, torch.Tensor):
      raise ValueError(f"{where} is a {type(t).__name__}, not a tensor; if the state dict is one entry"
                       " of the file (e.g. 'state_dict' or 'model'), pass entry=")
    dtype = _torch_dtype(t, where)
    entries[str(name)] = LazyTensor(tuple(t.shape), dtype, lambda t=t, d=dtype: _torch_to_numpy(t, d), where)
  return entries


# --- reading -----------------------------------------------------------------------------------


def read_state_dict(path: PathLike, *, dtype: Any = None, entry: str | None = None) -> StateDict:
  """A lazy state dict of a safetensors file, a sharded directory or a torch file.

  Only headers are read here; each tensor is read when its entry is
  (`np.asarray(state[name])`), so a checkpoint larger than memory can be
  checked and merged one tensor at a time.

  Args:
    path: a `.safetensors` file; a `*.safetensors.index.json` (HF's sharded
      layout, its `weight_map` naming each tensor's file); a directory holding
      one such index, or else exactly one `.safetensors` file; or a torch
      state dict `.pt`/`.bin`/`.pth` (needs torch; loaded with
      `weights_only=True`, memory-mapped when it is a zip archive).
    dtype: None keeps every dtype (bfloat16 and float16 too); a floating dtype
      casts the floating tensors to it on read (integer and bool tensors,
      e.g. position ids, are kept).
    entry: for a torch file holding more than its state dict (Lightning's
      `{"state_dict": ..., "epoch": ...}`), the entry that holds it.

  Returns:
    A `StateDict`: name -> `LazyTensor` (`.shape`, `.dtype`, `np.asarray`).

  Raises:
    FileNotFoundError: `path`, or a shard its index names, does not exist.
    ValueError: a file that is not what its name says (a zip or pickle named
      `.safetensors`, a truncated or malformed header, an index whose shards
      disagree with it), a torch file that `weights_only=True` refuses, a
      non-floating `dtype`: each naming the file and tensor.
    ImportError: a torch file where torch does not import.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  if entry is not None and path.suffix not in TORCH_SUFFIXES:
    raise ValueError(f"entry={entry!r} is for torch files; {path} is not one")
  metadata: dict[str, Any] = {}
  if path.is_dir():
    path = _directory_source(path)
  if path.name.endswith(INDEX_SUFFIX):
    entries, metadata = _sharded_entries(path)
  elif path.suffix == ".safetensors":
    entries, metadata = _safetensors_entries(path)
  elif path.suffix in TORCH_SUFFIXES:
    entries = _torch_entries(path, entry)
  else:
    raise ValueError(f"{path}: unknown state dict format; expected .safetensors, *{INDEX_SUFFIX},"
                     f" a directory of them, or a torch file {TORCH_SUFFIXES}")
  if dtype is not None:
    entries = _cast(entries, dtype)
  return StateDict(entries, source=str(path), metadata=metadata)


# --- writing -----------------------------------------------------------------------------------

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
  """Bytes of `size`: an int, or a string such as "5GB", "500MB", "2GiB" (HF's units)."""
  if isinstance(size, int) and not isinstance(size, bool):
    n = size
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not match:
      raise ValueError(f"max_shard_size {size!r} is not a size such as 5000000, '500MB' or '2GiB'")
    n = int(float(match.group(1)) * _UNITS[match.group(2)])
  if n <= 0:
    raise ValueError(f"max_shard_size {size!r} must be positive")
  return n


def check_output_path(path: PathLike, max_shard_size: int | str | None = None) -> None:
  """Raises ValueError unless `write_safetensors` can write `path` so `read_state_dict` reads it.

  One file must end in `.safetensors`; shards (`max_shard_size`, checked
  too) go into a directory, whose name must not.
  """
  path = pathlib.Path(path)
  if max_shard_size is None and path.suffix != ".safetensors":
    raise ValueError(f"{path}: a safetensors file's name must end in .safetensors")
  if max_shard_size is not None:
    parse_size(max_shard_size)
    if path.suffix == ".safetensors":
      raise ValueError(f"{path}: shards go into a directory, not a .safetensors file")


def _root_buffer(x: np.ndarray) -> Any:
  while isinstance(x.base, np.ndarray):
    x = x.base
  return x.base if x.base is not None else x


def _check_shared(tensors: Mapping[str, Any]) -> None:
  """Raises ValueError naming two entries that are one object or share memory."""
  seen: dict[int, str] = {}
  for name, value in tensors.items():
    ids = [id(value)]
    if isinstance(value, np.ndarray) and value.size:
      ids.append(id(_root_buffer(value)))
    for i in ids:
      if i in seen and seen[i] != name:
        raise ValueError(
            f"tensors {seen[i]!r} and {name!r} are the same tensor or share memory: write it once"
            f" and name the other in aliases= (e.g. aliases={{{name!r}: {seen[i]!r}}}), or drop it")
      seen[i] = name


def _declared(name: str, value: Any) -> tuple[tuple[int, ...], np.dtype]:
  if not hasattr(value, "shape") or not hasattr(value, "dtype"):
    raise ValueError(f"tensor {name!r} is a {type(value).__name__}, not an array")
  dtype = np.dtype(value.dtype)
  if dtype not in _CODES:
    raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors code ({sorted(SAFETENSORS_DTYPES)})")
  return tuple(int(n) for n in value.shape), dtype


def _drop_aliases(tensors: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, Any]:
  """`tensors` without the aliases, after checking each equals the tensor it names."""
  for alias, target in aliases.items():
    if target not in tensors or target in aliases:
      raise ValueError(f"aliases: {alias!r} -> {target!r}, which is not a written tensor")
    if alias in tensors:
      a, b = np.asarray(tensors[alias]), np.asarray(tensors[target])
      if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
        raise ValueError(f"aliases: {alias!r} {a.shape} {a.dtype} differs from {target!r}"
                         f" {b.shape} {b.dtype}, so it cannot be written as that tensor")
  return {name: value for name, value in tensors.items() if name not in aliases}


def _write_file(path: pathlib.Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
  """One safetensors file, each tensor materialised and written in turn."""
  header: dict[str, Any] = {"__metadata__": dict(metadata)}
  offset, declared = 0, {}
  for name, value in tensors.items():
    shape, dtype = declared[name] = _declared(name, value)
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for name, value in tensors.items():
      x = np.asarray(value)
      if (x.shape, x.dtype) != declared[name]:
        raise ValueError(f"tensor {name!r} is {x.shape} {x.dtype}, declared {declared[name]}")
      f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)


def _shards(tensors: Mapping[str, Any], max_bytes: int) -> list[list[str]]:
  """Names in order, cut greedily into shards of at most `max_bytes` (a larger tensor alone)."""
  shards: list[list[str]] = [[]]
  used = 0
  for name, value in tensors.items():
    shape, dtype = _declared(name, value)
    nbytes = math.prod(shape) * dtype.itemsize
    if shards[-1] and used + nbytes > max_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += nbytes
  return shards


def write_safetensors(
    path: PathLike,
    tensors: Mapping[str, Any],
    *,
    metadata: Mapping[str, str] | None = None,
    aliases: Mapping[str, str] | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes a state dict as safetensors: one file, or HF-style shards and an index.

  Each tensor is materialised (`np.asarray`) only when its bytes are
  written, in the order of `tensors`, so a lazy mapping (a `StateDict`, or
  `LazyTensor`s that compute a merged tensor) is written with one tensor in
  memory. The file is written beside `path` and renamed when complete.
  Files written here load with `safetensors.torch.load_file` and
  `safetensors.numpy.load_file` (dtypes as given, bfloat16 included).

  Args:
    path: the `.safetensors` file; with `max_shard_size`, the directory that
      receives `model-0000i-of-0000n.safetensors` and
      `model.safetensors.index.json` (`{"metadata": {"total_size": bytes},
      "weight_map": {name: file}}`).
    tensors: name -> array (NumPy, JAX, `LazyTensor`: anything with `shape`,
      `dtype` and `__array__`). Entries that are one object or share memory
      are refused unless all but one are named in `aliases`.
    metadata: strings stored as the `__metadata__` of every file;
      `"format": "pt"` is added unless given (transformers reads only
      safetensors files that declare their format).
    aliases: `{name: name it duplicates}` for tied tensors (e.g.
      `{"lm_head.weight": "transformer.wte.weight"}`): the alias is written
      once, as the tensor it names, after checking that they are equal where
      `tensors` holds both.
    max_shard_size: bytes per shard (an int, or "500MB", "2GiB"); None: one file
      (whose name must end in `.safetensors`).
    overwrite: replace an existing `path`.

  Returns:
    The absolute path written (the file, or the shards' directory).

  Raises:
    ValueError: an entry without shape or dtype or with a dtype safetensors
      lacks, shared tensors not named in `aliases`, an alias that differs
      from its tensor, metadata that is not strings, a bad `max_shard_size`,
      a file name that does not end in `.safetensors` (a directory's that does):
      each naming the tensor, before anything is written.
    FileExistsError: `path` exists and `overwrite` is False.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  metadata = {"format": "pt", **(metadata or {})}
  if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise ValueError(f"metadata must map strings to strings, got {metadata}")
  check_output_path(path, max_shard_size)
  max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
  tensors = _drop_aliases(tensors, aliases or {})
  _check_shared(tensors)
  for name, value in tensors.items():
    _declared(name, value)
  path.parent.mkdir(parents=True, exist_ok=True)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".writing", dir=path.parent))
  try:
    if max_bytes is None:
      new = scratch / path.name
      _write_file(new, tensors, metadata)
    else:
      new = scratch / "shards"
      new.mkdir()
      shards = _shards(tensors, max_bytes)
      weight_map, total = {}, 0
      for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_file(new / file, {n: tensors[n] for n in names}, metadata)
        for n in names:
          weight_map[n] = file
          shape, dtype = _declared(n, tensors[n])
          total += math.prod(shape) * dtype.itemsize
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      (new / ("model" + INDEX_SUFFIX)).write_text(json.dumps(index, indent=2) + "\n")
    if path.exists():
      aside = scratch / "replaced"
      path.rename(aside)
    new.rename(path)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return path
