r"""CLIP with a ViT-B/32 image tower (Radford et al. 2021), at open_clip's ViT-B-32 shapes.

Full size, on a TPU or GPU host (point `data.train` at real data for real training):

  python -m clipjax.main --config=configs/clip_vitb32.py --workdir=/tmp/clip_vitb32

On a laptop CPU, a tiny model on the built-in `shapes` dataset, in a few minutes:

  python -m clipjax.main --config=configs/clip_vitb32.py:local --workdir=/tmp/clip_local

Any field can be overridden, e.g. `--config.batch_size=256 --config.optim.lr=3e-4`.
"""

from clipjax.config import apply_local, base_config


def get_config(arg: str | None = None):
    if arg not in (None, "", "local"):
        raise ValueError(f"configs/clip_vitb32.py takes no argument or 'local', got {arg!r}.")
    c = base_config()  # CLIP ViT-B/32, batch 32k, AdamW
    return apply_local(c) if arg == "local" else c
