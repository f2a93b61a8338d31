"""Reading and writing models: orbax checkpoints, other libraries' state dicts
(`read_state_dict`, `write_safetensors`, `NameMap`, the families of `convert`)."""

from mergejax.io import convert

from mergejax.io.checkpoint import check_fits
from mergejax.io.checkpoint import load_metadata
from mergejax.io.checkpoint import restore
from mergejax.io.checkpoint import save
from mergejax.io.name_map import NameMap
from mergejax.io.out_of_core import merge_checkpoints
from mergejax.io.state_dict import LazyTensor
from mergejax.io.state_dict import read_state_dict
from mergejax.io.state_dict import StateDict
from mergejax.io.state_dict import write_safetensors
