"""FILIP's token-wise scores for evaluation, in numpy: each query example against each key
example, the mean over the query's tokens of the max over the key's tokens of their dot products
(`losses.token_similarity` is the same score in training, on the selected tokens).

Zero-shot classification scores images against class tokens (queries: patches), retrieval
scores both ways: image → captions with the image's patches as queries, caption → images with
the caption's tokens. Every token of the other side takes part; there is no pair to select by.
"""

import numpy as np

# Similarities built at once: bounds memory (COCO: 5k images × 25k captions × 49 × 77).
_CHUNK_ELEMENTS = 1 << 24


def token_mask(tokens: np.ndarray) -> np.ndarray:
    """(n, L, d) tokens -> (n, L) bool: the tokens that count. The objectives' token embeddings
    are the zero vector where a token does not count (padding, the start token)."""
    return np.abs(tokens).sum(axis=-1) > 0


def scores(
    queries: np.ndarray,
    keys: np.ndarray,
    *,
    query_mask: np.ndarray | None = None,
    key_mask: np.ndarray | None = None,
    max_elements: int = _CHUNK_ELEMENTS,
) -> np.ndarray:
    """Late interaction of (n, Q, d) query tokens with (c, K, d) key tokens -> (n, c).

    Args:
      queries, keys: unit tokens, in the same space.
      query_mask: (n, Q) bool, the query tokens averaged over (None: all); one True a row.
      key_mask: (c, K) bool, the key tokens maxed over (None: all); one True a row.
      max_elements: similarities built at once; the queries go in chunks of that many.
    Returns:
      scores[i, j] = mean over valid query tokens q of i of max over valid key tokens k of j
      of ⟨q, k⟩.
    """
    n, num_q, dim = queries.shape
    c, num_k, _ = keys.shape
    flat_keys = keys.reshape(c * num_k, dim).T
    rows = max(1, max_elements // max(1, num_q * c * num_k))
    out = np.empty((n, c), np.result_type(queries, keys))
    for start in range(0, n, rows):
        chunk = queries[start : start + rows]
        sim = (chunk.reshape(-1, dim) @ flat_keys).reshape(len(chunk), num_q, c, num_k)
        if key_mask is not None:
            sim = np.where(key_mask[None, None], sim, -np.inf)
        best = sim.max(axis=-1)  # (chunk, Q, c)
        if query_mask is None:
            out[start : start + rows] = best.mean(axis=1)
        else:
            valid = query_mask[start : start + rows, :, None]
            out[start : start + rows] = np.where(valid, best, 0.0).sum(axis=1) / valid.sum(axis=1)
    return out
