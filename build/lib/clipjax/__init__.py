"""clipjax: CLIP, DeCLIP, CLIP-Lite and SigLIP training in JAX/Flax."""


def load(path: str, step: int | None = None, tokenizer: str | None = None):
    """A clipjax workdir, a clipjax export or an open_clip local-dir folder -> a
    `clipjax.inference.Model` (tokenize, preprocess, encode_image, encode_text). See
    `clipjax/inference.py`."""
    from clipjax import inference  # jax and the models load on first use, not on import

    return inference.load(path, step=step, tokenizer=tokenizer)
