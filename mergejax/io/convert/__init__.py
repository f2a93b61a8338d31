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

from mergejax.io.convert import gpt2
from mergejax.io.convert import llama
from mergejax.io.convert import open_clip_vit
from mergejax.io.convert import timm_vit
from mergejax.io.convert import torchvision_resnet
from mergejax.io.convert.base import check_state
from mergejax.io.convert.base import Converter

# One entry per family: name -> Converter (each family's module defines CONVERTER).
CONVERTERS: dict[str, Converter] = {
    "gpt2": gpt2.CONVERTER,
    "llama": llama.CONVERTER,
    "open_clip_vit": open_clip_vit.CONVERTER,
    "timm_vit": timm_vit.CONVERTER,
    "torchvision_resnet18": torchvision_resnet.RESNET18,
    "torchvision_resnet50": torchvision_resnet.RESNET50,
}
