"""Image↔text retrieval recall over paired embeddings."""

import numpy as np


def recall_at_k(
    image_embeds: np.ndarray, text_embeds: np.ndarray, ks=(1, 5, 10)
) -> dict[str, float]:
    """R@k both ways for n images paired with n captions (row i of each is a pair).

    Returns keys `i2t_r{k}` (images query captions) and `t2i_r{k}` (captions query images).
    """
    sims = image_embeds @ text_embeds.T
    diag = np.diag(sims)
    rank_i2t = (sims > diag[:, None]).sum(axis=1)  # captions beating the true one, per image
    rank_t2i = (sims > diag[None, :]).sum(axis=0)  # images beating the true one, per caption
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((rank_i2t < k).mean())
        out[f"t2i_r{k}"] = float((rank_t2i < k).mean())
    return out
