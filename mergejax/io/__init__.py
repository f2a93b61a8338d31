"""Reading and writing models: orbax checkpoints, other libraries' state dicts (`convert`)."""

from mergejax.io import convert

from mergejax.io.checkpoint import check_fits
from mergejax.io.checkpoint import load_metadata
from mergejax.io.checkpoint import restore
from mergejax.io.checkpoint import save
from mergejax.io.out_of_core import merge_checkpoints
