r"""CLIP with a ViT-B/32 image tower (Radford et al. 2021), at open_clip's ViT-B-32 shapes.

Full size, on a TPU or GPU host (point `data.train` at real data for real training):

  python -m clipjax.main --config=configs/clip_vitb32.py --workdir=/tmp/clip_vitb32

On a laptop CPU, a tiny model on the built-in `shapes` dataset, in a few minutes:

  python -m clipjax.main --config=configs/clip_vitb32.py:local --workdir=/tmp/clip_local

Any field can be overridden, e.g. `--config.batch_size=256 --config.optim.lr=3e-4`.
"""

from clipjax.config import base_config


def get_config(arg: str | None = None):
    if arg not in (None, "", "local"):
        raise ValueError(f"configs/clip_vitb32.py takes no argument or 'local', got {arg!r}.")
    c = base_config()  # CLIP ViT-B/32, batch 32k, AdamW
    if arg == "local":
        c.batch_size = 128
        c.total_steps = 600
        c.log_every = 25
        c.eval_every = 200
        c.ckpt_every = 200

        c.model.embed_dim = 64
        c.model.image.variant = "Ti/8"
        c.model.image.size = 32
        c.model.image.depth = 4
        c.model.text.width = 128
        c.model.text.depth = 2
        c.model.text.heads = 4
        c.model.text.context_length = 24
        c.model.text.vocab_size = 512

        c.data.num_workers = 1
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 50
        c.optim.weight_decay = 0.1
        c.eval.num_examples = 512
    return c
