"""Converters between other libraries' state dicts and the zoo's variables.

A state dict is a flat mapping from the library's tensor names to arrays
(`mj.io.read_state_dict` reads one from safetensors or torch files, lazily).
Each family is one `Converter`, listed in `CONVERTERS` by name:

    state = mj.io.read_state_dict("gpt2/model.safetensors")
    conv = mj.io.convert.CONVERTERS["gpt2"]
    zoo_kwargs = conv.infer_config(state, library_config)   # -> models.build("lm", **zoo_kwargs)
    variables = conv.to_variables(state, zoo_kwargs)
    state_back = conv.from_variables(variables, zoo_kwargs)   # the library's names and layouts

Every layout change (a Linear's transpose, OIHW -> HWIO, a fused projection)
is written out in the family's module and tested both ways; `check_state`
refuses a state dict whose keys or shapes do not fit before anything is
converted, naming every missing, unexpected or misshapen key.
"""

from mergejax.io.convert.base import check_state
from mergejax.io.convert.base import Converter

# One entry per family: name -> Converter (each family's module defines CONVERTER).
CONVERTERS: dict[str, Converter] = {
}
