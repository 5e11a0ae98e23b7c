r"""SLIP (Mu et al. 2021) with a ViT-B/32 image tower, as DeCLIP's codebase trains it on YFCC15M.

Batch 4096, AdamW (β2 0.98, eps 1e-8, weight decay 0.5), warm-up from 1e-4 to 5e-4 over 2,500
steps, cosine to 0 at 128,000 steps. A base view (RandomResizedCrop at scale 0.5–1) for CLIP's
term; two MoCo v2 views (scale 0.2–1) through the SimCLR head (4096, 4096, 256) for NT-Xent at
temperature 0.1. The head's BatchNorm is per device, so `accum_steps` must stay 1.

  python -m clipjax.main --config=configs/slip_vitb32.py --workdir=/tmp/slip_vitb32 \
      --config.data.train=<your data>

On a laptop CPU, the tiny model and schedule of every `:local` config, with a SimCLR head of
(512, 512, 64):

  python -m clipjax.main --config=configs/slip_vitb32.py:local --workdir=/tmp/slip_local
"""

from clipjax.config import apply_local, base_config, clip_benchmark_recipe


def get_config(arg: str | None = None):
    if arg not in (None, "", "local"):
        raise ValueError(f"configs/slip_vitb32.py takes no argument or 'local', got {arg!r}.")
    c = clip_benchmark_recipe(base_config(), "slip", lr=5e-4, weight_decay=0.5)
    c.data.augment.crop_scale = (0.5, 1.0)  # the base view; the SSL views: c.slip.ssl_augment
    if arg == "local":
        apply_local(c)
        c.optim.warmup_from = 0.0
        c.slip.head_width = 512
        c.slip.head_dim = 64
    return c
