r"""Merge checkpoints from files: orbax, safetensors or torch in, safetensors or orbax out.

    python -m experiments.merge_checkpoints --method=ties \
        --models=ft_a.safetensors,ft_b.safetensors,ft_c.safetensors --base=base.safetensors \
        --set=density=0.2 --set=scale=1.0 --output=/tmp/merged.safetensors

Merges N checkpoints with the method of `mj.merge` that `--method` names
(`mj.io.out_of_core.METHODS`: average, metric_weighted_average,
task_arithmetic, ties, dare, dare_ties, consensus_task_arithmetic,
consensus_ties, sce, pcb, widen, doge, fisher, ota), its keyword arguments
given as `--set=name=value` (the value read as JSON, else as a string) and
its random key, where it takes one (DARE), by `--seed`.

Inputs (`--models`, `--base`, `--fishers`) are orbax checkpoints
(`mj.io.save`), safetensors files, sharded safetensors directories (with
their `*.safetensors.index.json`) or torch `.pt`/`.bin`/`.pth` state dicts
(read with `weights_only=True`; torch must import).

Without `--family` the checkpoints are merged as they are, one tensor at a
time (`mj.io.merge_checkpoints`: one tensor per input in memory), a tensor
name's dots splitting it into a key path, and written in their own names:
`--output_format=safetensors` (one file, or shards and an index in the
directory `--output` with `--max_shard_size`) or `orbax`.

With `--family=<name>` (a key of `mj.io.convert.CONVERTERS`; its library's
config, e.g. HF's config.json, by `--family_config`), each input state dict
is converted to the zoo model's variables, one model at a time, and saved
in a scratch directory beside `--output`; those are merged out of core, and
the merged variables are written as an orbax checkpoint (metadata: the zoo
model and its config) or converted back to the library's names and layouts
as safetensors. A merge of converted models is the merge of the zoo model's
leaves (TIES's per-tensor trim ranks within each zoo leaf).

Every option, the method's arguments (a dry run of the method), the inputs'
headers and, with a family, every input's inferred config are checked
before any tensor is read. Progress is logged per tensor (absl, INFO).
"""

from collections.abc import Mapping, Sequence
import inspect
import json
import pathlib
import shutil
import tempfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax

from experiments import logs
import mergejax as mj
from mergejax.io import out_of_core
from mergejax.io import state_dict

OUTPUT_FORMATS = out_of_core.OUTPUT_FORMATS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this program's flags on `flag_values` (tests pass their own)."""
  flags.DEFINE_enum("method", None, list(out_of_core.METHODS), "The merge (mj.merge.<method>).",
                    flag_values=flag_values)
  flags.DEFINE_list("models", None, "Checkpoints to merge (orbax, safetensors, torch).", flag_values=flag_values)
  flags.DEFINE_string("base", None, "The pre-trained checkpoint of task-vector merges.", flag_values=flag_values)
  flags.DEFINE_list("fishers", None, "For fisher and ota: one curvature checkpoint per model.",
                    flag_values=flag_values)
  flags.DEFINE_string("output", None, "The merged checkpoint (file or directory).", flag_values=flag_values)
  flags.DEFINE_enum("output_format", "safetensors", list(OUTPUT_FORMATS), "How to write the merge.",
                    flag_values=flag_values)
  flags.DEFINE_string("max_shard_size", None, "Safetensors shards of at most this size (e.g. 2GB).",
                      flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --output.", flag_values=flag_values)
  flags.DEFINE_string("family", None, "Convert through mj.io.convert.CONVERTERS[family].", flag_values=flag_values)
  flags.DEFINE_string("family_config", None, "JSON file of the family library's config (HF config.json).",
                      flag_values=flag_values)
  flags.DEFINE_multi_string("set", [], "A keyword argument of the method: name=value (JSON value).",
                            flag_values=flag_values)
  flags.DEFINE_integer("seed", None, "Seed of the method's random key (DARE, DARE-TIES).", flag_values=flag_values)
  flags.mark_flags_as_required(["method", "models", "output"], flag_values=flag_values)


def parse_options(settings: Sequence[str]) -> dict[str, Any]:
  """`["density=0.2", "trim=global"]` -> `{"density": 0.2, "trim": "global"}` (JSON values, else strings)."""
  options = {}
  for setting in settings:
    name, sep, text = setting.partition("=")
    if not sep or not name.isidentifier():
      raise ValueError(f"--set={setting!r} is not name=value")
    if name in options:
      raise ValueError(f"--set gives {name} twice")
    try:
      options[name] = json.loads(text)
    except json.JSONDecodeError:
      options[name] = text
  return options


def method_options(method: str, options: Mapping[str, Any], seed: int | None) -> dict[str, Any]:
  """The method's keyword arguments: `options` (names checked) and `key` from `seed`.

  Raises:
    ValueError: a name the method does not take (or `key`, which comes from
      --seed), a seed the method does not use, or none where it needs one.
  """
  parameters = inspect.signature(getattr(mj.merge, method)).parameters
  inputs = 1 if out_of_core.METHODS[method] == "models" else 2  # (models) or (base | fishers, models)
  named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
  keywords = {n for n, p in list(parameters.items())[inputs:] if p.kind in named}
  unknown = sorted(set(options) - (keywords - {"key"}))
  if unknown:
    raise ValueError(f"--set: {method} takes no {unknown}; it takes {sorted(keywords - {'key'})}"
                     + (" and its key from --seed" if "key" in keywords else ""))
  kwargs = dict(options)
  if "key" in keywords:
    needed = parameters["key"].default is inspect.Parameter.empty
    if seed is None and needed:
      raise ValueError(f"{method} draws random masks: pass --seed")
    if seed is not None:
      kwargs["key"] = jax.random.key(seed)
  elif seed is not None:
    raise ValueError(f"{method} is not random: it takes no --seed")
  return kwargs


def _check_paths(paths: Sequence[str]) -> list[pathlib.Path]:
  missing = [p for p in paths if not pathlib.Path(p).exists()]
  if missing:
    raise FileNotFoundError(f"inputs that do not exist: {missing}")
  return [pathlib.Path(p).absolute() for p in paths]


def _family_config(path: str | None) -> dict[str, Any] | None:
  if path is None:
    return None
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"--family_config {path} is not a readable JSON file ({e})") from e


def _convert_all(
    converter: mj.io.convert.Converter,
    zoo_kwargs: dict[str, Any],
    states: Mapping[pathlib.Path, state_dict.StateDict],
    scratch: pathlib.Path,
) -> dict[pathlib.Path, pathlib.Path]:
  """Each state dict as the zoo model's variables in an orbax checkpoint in `scratch`, one at a time."""
  converted = {}
  for i, (path, state) in enumerate(states.items()):
    logging.info("converting %d/%d: %s", i + 1, len(states), path)
    variables = converter.to_variables(state, zoo_kwargs)
    converted[path] = mj.io.save(scratch / f"input_{i}", variables)
    del variables
  return converted


def _jsonable(value: Any) -> Any:
  try:
    json.dumps(value)
    return value
  except TypeError:
    return repr(value)


def run(
    *,
    method: str,
    models: Sequence[str],
    output: str,
    base: str | None = None,
    fishers: Sequence[str] | None = None,
    output_format: str = "safetensors",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    family: str | None = None,
    family_config: str | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> pathlib.Path:
  """Merges the checkpoints as the flags say; returns the output path.

  Raises:
    ValueError, FileNotFoundError, FileExistsError: a bad option, input or
      output, each naming it, before any tensor is read.
  """
  if output_format not in OUTPUT_FORMATS:
    raise ValueError(f"--output_format={output_format!r} is not one of {OUTPUT_FORMATS}")
  if max_shard_size is not None:
    if output_format != "safetensors":
      raise ValueError("--max_shard_size is for --output_format=safetensors")
    state_dict.parse_size(max_shard_size)
  out = pathlib.Path(output).absolute()
  if output_format == "safetensors":
    state_dict.check_output_path(out, max_shard_size)
  if out.exists() and not overwrite:
    raise FileExistsError(f"--output {out} exists; pass --overwrite to replace it")
  if method not in out_of_core.METHODS:
    raise ValueError(f"--method={method!r} is not one of {tuple(out_of_core.METHODS)}")
  kwargs = method_options(method, options or {}, seed)
  model_paths = _check_paths(models)
  base_path = None if base is None else _check_paths([base])[0]
  fisher_paths = None if fishers is None else _check_paths(fishers)
  out_of_core._check_arguments(method, model_paths, base_path, fisher_paths)  # pylint: disable=protected-access
  out_of_core.check_method_arguments(method, len(model_paths), **kwargs)
  inputs = dict(base_path=base_path, fisher_paths=fisher_paths)
  if family is None:
    if family_config is not None:
      raise ValueError("--family_config is for --family")
    return out_of_core.merge_checkpoints(
        method, model_paths, out, **inputs, overwrite=overwrite, output_format=output_format,
        max_shard_size=max_shard_size, progress=True, **kwargs)
  return _run_family(method, model_paths, out, inputs, output_format, max_shard_size, overwrite, family,
                     _family_config(family_config), kwargs)


def _run_family(
    method: str,
    model_paths: list[pathlib.Path],
    out: pathlib.Path,
    inputs: dict[str, Any],
    output_format: str,
    max_shard_size: str | int | None,
    overwrite: bool,
    family: str,
    library_config: dict[str, Any] | None,
    kwargs: dict[str, Any],
) -> pathlib.Path:
  """Converts every input to the zoo model's variables, merges them out of core, writes the result."""
  if family not in mj.io.convert.CONVERTERS:
    raise ValueError(f"--family={family!r} is not one of {sorted(mj.io.convert.CONVERTERS)}")
  converter = mj.io.convert.CONVERTERS[family]
  paths = model_paths + [p for p in [inputs["base_path"]] if p] + list(inputs["fisher_paths"] or [])
  states = {p: state_dict.read_state_dict(p) for p in paths}
  zoo_kwargs = converter.infer_config(states[paths[0]], library_config)
  for path, state in states.items():
    other = converter.infer_config(state, library_config)
    if other != zoo_kwargs:
      raise ValueError(f"{path} is a {family} of config {other}, {paths[0]} of {zoo_kwargs}")
  out.parent.mkdir(parents=True, exist_ok=True)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".converting", dir=out.parent))
  try:
    converted = _convert_all(converter, zoo_kwargs, states, scratch)
    merged_path = out_of_core.merge_checkpoints(
        method, [converted[p] for p in model_paths], scratch / "merged",
        base_path=converted.get(inputs["base_path"]),
        fisher_paths=None if inputs["fisher_paths"] is None else [converted[p] for p in inputs["fisher_paths"]],
        progress=True, **kwargs)
    merged = mj.io.restore(merged_path)
    record = {"method": method, "paths": [str(p) for p in model_paths],
              "base_path": None if inputs["base_path"] is None else str(inputs["base_path"]),
              "fisher_paths": None if inputs["fisher_paths"] is None else [str(p) for p in inputs["fisher_paths"]],
              "family": family}
    if output_format == "orbax":
      metadata = {"model": converter.zoo_name, "config": _jsonable(zoo_kwargs), "merge": record}
      return mj.io.save(out, merged, metadata=metadata, overwrite=overwrite)
    tensors = converter.from_variables(merged, zoo_kwargs)
    return state_dict.write_safetensors(out, tensors, metadata={"mergejax_merge": json.dumps(record)},
                                        max_shard_size=max_shard_size, overwrite=overwrite)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def run_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> pathlib.Path:
  """`run` with the values of this program's flags."""
  fv = flag_values
  return run(method=fv.method, models=fv.models, output=fv.output, base=fv.base, fishers=fv.fishers,
             output_format=fv.output_format, max_shard_size=fv.max_shard_size, overwrite=fv.overwrite,
             family=fv.family, family_config=fv.family_config, options=parse_options(fv.set), seed=fv.seed)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  out = run_from_flags()
  logging.info("merged checkpoint: %s", out)
  print(out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
