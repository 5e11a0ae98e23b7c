r"""DeCLIP (Li et al. 2021) with CLIP's modified ResNet-50 image tower: the official recipe.

The same optimisation recipe as `configs/declip_vitb32.py`, with an RN50 image tower (attention
pooling, output 1024) and a 1024-wide joint space.

  python -m clipjax.main --config=configs/declip_r50.py --workdir=/tmp/declip_r50 \
      --config.data.train=<your data>

On a laptop CPU, a narrow RN50 (stem width 8) on 32-px images with the `:local` schedule:

  python -m clipjax.main --config=configs/declip_r50.py:local --workdir=/tmp/declip_r50_local
"""

from clipjax.config import base_config
from configs.declip_vitb32 import declip_recipe, local


def get_config(arg: str | None = None):
    if arg not in (None, "", "local"):
        raise ValueError(f"configs/declip_r50.py takes no argument or 'local', got {arg!r}.")
    c = declip_recipe(base_config())
    c.model.image.variant = "RN50"
    c.model.embed_dim = 1024
    if arg == "local":
        local(c)
        c.model.image.variant = "RN50"
        c.model.image.width = 8
    return c
