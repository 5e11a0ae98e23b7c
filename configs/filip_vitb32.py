r"""FILIP (Yao et al. 2021) with a ViT-B/32 image tower, as DeCLIP's codebase trains it on YFCC15M.

Batch 4096, AdamW (β2 0.98, eps 1e-8, weight decay 0.5), warm-up from 1e-4 to 5e-4 over 2,500
steps, cosine to 0 at 128,000 steps, MoCo v2's views (scale 0.2–1). Patch and caption tokens
mapped to 256, the top 16 of each side of a pair selected; the token-wise loss alone (CLIP's
global term at weight 0, as the reference), padding masked (`filip.mask_padding=False`: the
reference's unmasked form). The token-wise similarities travel around the device ring
(`filip.chunked`). Zero-shot classification is token-wise.

Where the reference's YFCC15M config differs (read in Sense-GVT/DeCLIP, not followed here):
its text tower reads the MLM-masked caption (`text_mask_type: MLM`), and both logit scales'
θ are clamped into [3, 6] after each step; clipjax reads the plain caption and clamps θ as
CLIP does, in [0, ln 100] (`filip.log_scale_range`), as METHODS.md specifies.

  python -m clipjax.main --config=configs/filip_vitb32.py --workdir=/tmp/filip_vitb32 \
      --config.data.train=<your data>

On a laptop CPU, the tiny model and schedule of every `:local` config, tokens mapped to 64 and
the top 8 of the 16 patches kept:

  python -m clipjax.main --config=configs/filip_vitb32.py:local --workdir=/tmp/filip_local
"""

from clipjax.config import apply_local, base_config, clip_benchmark_recipe


def get_config(arg: str | None = None):
    if arg not in (None, "", "local"):
        raise ValueError(f"configs/filip_vitb32.py takes no argument or 'local', got {arg!r}.")
    c = clip_benchmark_recipe(base_config(), "filip", lr=5e-4, weight_decay=0.5)
    c.data.augment.recipe = "mocov2"
    c.data.augment.crop_scale = (0.2, 1.0)
    if arg == "local":
        apply_local(c)
        c.optim.warmup_from = 0.0
        c.data.augment.recipe = "clip"  # as DeCLIP's `:local`: MoCo v2 crops hurt at 32 px
        c.data.augment.crop_scale = (0.9, 1.0)
        c.filip.dim = 64
        c.filip.top_k = 8
        c.filip.chunked = False  # at batch 128 the gathered similarities are small
    return c
