r"""DeFILIP with a ViT-B/32 image tower, as DeCLIP's codebase trains it on YFCC15M.

DeCLIP's recipe and terms (configs/declip_vitb32.py: 0.4 MVS, 0.2 ISS, 0.2 TSS, 0.2 NNS) plus
FILIP's token-wise term at weight 0.2 on image view 1 and the masked caption (config.filip:
tokens mapped to 256, the top 16 selected, padding masked).

  python -m clipjax.main --config=configs/defilip_vitb32.py --workdir=/tmp/defilip_vitb32 \
      --config.data.train=<your data>

On a laptop CPU, DeCLIP's `:local` (without NNS) plus FILIP's `:local` token sizes:

  python -m clipjax.main --config=configs/defilip_vitb32.py:local --workdir=/tmp/defilip_local
"""

from configs import declip_vitb32


def get_config(arg: str | None = None):
    if arg not in (None, "", "local"):
        raise ValueError(f"configs/defilip_vitb32.py takes no argument or 'local', got {arg!r}.")
    c = declip_vitb32.get_config(arg)
    c.objective = "defilip"
    if arg == "local":
        c.filip.dim = 64
        c.filip.top_k = 8
        c.filip.chunked = False
    return c
