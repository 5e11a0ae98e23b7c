r"""CLIP with a ViT-B/32 image tower (Radford et al. 2021), at open_clip's ViT-B-32 shapes.

Full size, on a TPU or GPU host (point `data.train` at real data for real training):

  python -m clipjax.main --config=configs/clip_vitb32.py --workdir=/tmp/clip_vitb32

On a laptop CPU, a tiny model on the built-in `shapes` dataset, in a few minutes:

  python -m clipjax.main --config=configs/clip_vitb32.py:local --workdir=/tmp/clip_local

Any field can be overridden, e.g. `--config.batch_size=256 --config.optim.lr=3e-4`.

What it needs (`python -m clipjax.plan --config=configs/clip_vitb32.py --target=...`,
compiled, not run): at this batch it fits 256 TPU v5e chips (5.74 of 16 GiB per chip). On 8
H100s the batch does not fit at once (136 GiB per GPU); with `--config.accum_steps=2` it does
(34.7 of 79.1 GiB per GPU).

Large batches on few devices, and the recipes open_clip and big_vision users know:
  --config.accum_steps=8                 contrastive gradient accumulation (GradCache): the
                                         loss sees every negative of the global batch, each
                                         device holds one eighth of its activations
  --config.init_from=DIR --config.model.image.locked=True
                                         LiT: a pretrained image tower (and its projection)
                                         locked, the text tower trained against it;
                                         --config.optim.frozen=REGEX freezes any parameters
  --config.model.image.patch_dropout=0.5 FLIP: half the patch tokens dropped in training
"""

from clipjax.config import apply_local, base_config


def get_config(arg: str | None = None):
    if arg not in (None, "", "local"):
        raise ValueError(f"configs/clip_vitb32.py takes no argument or 'local', got {arg!r}.")
    c = base_config()  # CLIP ViT-B/32, batch 32k, AdamW
    return apply_local(c) if arg == "local" else c
