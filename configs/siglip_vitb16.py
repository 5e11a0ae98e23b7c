r"""SigLIP (Zhai et al. 2023) with a ViT-B/16 image tower: sigmoid loss, chunked over devices.

Full size (B/16 at 224 px, text 768 wide with 12 layers, vocab 32k, context 64), batch 32k:

  python -m clipjax.main --config=configs/siglip_vitb16.py --workdir=/tmp/siglip_vitb16

On a laptop CPU, the same tiny model and schedule as every `:local` config:

  python -m clipjax.main --config=configs/siglip_vitb16.py:local --workdir=/tmp/siglip_local

`--config.accum_steps=K` accumulates the gradient over K micro-batches with the sigmoid loss
still over the whole batch; `--config.model.image.locked=True` (with `init_from`) and
`--config.model.image.patch_dropout=P` work as in configs/clip_vitb32.py.

What it needs (`python -m clipjax.plan --config=configs/siglip_vitb16.py --target=...`,
compiled, not run): at this batch it fits 256 TPU v5e chips (11.50 of 16 GiB per chip, no
rematerialisation). On 8 H100s the batch does not fit at once (304 GiB per GPU); with
`--config.accum_steps=4` it does (62.8 of 79.1 GiB per GPU).
"""

from clipjax.config import apply_local, base_config


def get_config(arg: str | None = None):
    if arg not in (None, "", "local"):
        raise ValueError(f"configs/siglip_vitb16.py takes no argument or 'local', got {arg!r}.")
    c = base_config()
    c.objective = "siglip"
    c.model.image.variant = "B/16"
    c.model.embed_dim = 768
    c.model.text.width = 768
    c.model.text.heads = 12
    c.model.text.context_length = 64
    c.model.text.vocab_size = 32_000
    c.optim.lr = 1e-3
    c.optim.b2 = 0.95
    c.optim.weight_decay = 1e-4
    return apply_local(c) if arg == "local" else c
