"""Caption augmentations for DeCLIP's text views: BERT-style masking (MLM) and EDA.

EDA (Wei & Zou 2019) here is one operation per caption, chosen uniformly among those available:
synonym replacement (needs a lexicon), random swap and random deletion. Captions are split on
whitespace and rejoined with single spaces; punctuation stays attached to its word.
"""

import functools
import re
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from absl import logging

# A word -> its synonyms (possibly none). `wordnet_lexicon()` makes one from NLTK's WordNet;
# tests pass a dict's lookup.
Lexicon = Callable[[str], Sequence[str]]

_STOP_WORDS = """
    a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its
    itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
"""
STOP_WORDS = frozenset(_STOP_WORDS.split())

_DELETION_PROB = 0.1
# A word's leading punctuation, its core (what the lexicon is asked about) and trailing one.
_WORD = re.compile(r"^(\W*)(.*?)(\W*)$")


def mlm_mask(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    ratio: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of one caption: int32 (L,) -> (masked tokens, labels), both int32 (L,).

    The candidates are the positions whose id is neither in `special_ids` (pass PAD, BOS, EOS and
    UNK) nor `mask_id`. `max(1, floor(ratio * n + 0.5))` of the n candidates (ratio * n rounded
    half up; none when n = 0; never more than ceil(ratio * L)) are chosen uniformly without
    replacement; each chosen position becomes `mask_id` with probability 0.8, a uniformly
    random id of the vocabulary other than the special ids and `mask_id` with probability 0.1,
    and stays unchanged otherwise. `labels` holds the original id at the chosen positions and 0
    elsewhere, so id 0 must be a special id.
    """
    excluded = {int(i) for i in special_ids} | {mask_id}
    if 0 not in excluded:
        raise ValueError(
            "mlm_mask: labels use 0 for 'not masked', so id 0 must be one of `special_ids` "
            "(it is PAD in clipjax's tokenizers and UNK in sentencepiece's default layout)."
        )
    tokens = np.asarray(tokens, np.int32)
    candidates = np.flatnonzero(~np.isin(tokens, list(excluded)))
    labels = np.zeros_like(tokens)
    if candidates.size == 0:
        return tokens.copy(), labels
    count = min(candidates.size, max(1, int(np.floor(ratio * candidates.size + 0.5))))
    chosen = rng.choice(candidates, count, replace=False)
    labels[chosen] = tokens[chosen]
    kind = rng.random(count)
    # Uniform over the allowed ids: a draw from [0, V - k), shifted past each excluded id.
    skipped = sorted(i for i in excluded if 0 <= i < vocab_size)
    random_ids = rng.integers(0, vocab_size - len(skipped), count)
    for i in skipped:
        random_ids += random_ids >= i
    masked = tokens.copy()
    masked[chosen[kind < 0.8]] = mask_id
    replaced = (kind >= 0.8) & (kind < 0.9)
    masked[chosen[replaced]] = random_ids[replaced]
    return masked, labels


class _WordNetLexicon:
    """WordNet synonyms of a word: every lemma of every synset, lower-cased, `_` as spaces."""

    def __init__(self, wordnet):
        self._wordnet = wordnet

    def __call__(self, word: str) -> tuple[str, ...]:
        names = {
            lemma.name().replace("_", " ").lower()
            for synset in self._wordnet.synsets(word)
            for lemma in synset.lemmas()
        }
        names.discard(word.lower())
        return tuple(sorted(names))


_WORDNET_LOCK = threading.Lock()


def wordnet_lexicon() -> Lexicon | None:
    """NLTK's WordNet as a `Lexicon`, or None (logging why, once per process) if nltk or its
    wordnet corpus is not installed."""
    with _WORDNET_LOCK:  # Grain's reader threads may ask at the same time
        return _load_wordnet()


@functools.cache
def _load_wordnet() -> Lexicon | None:
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("dog")  # the corpus loads lazily: LookupError when it is not installed
    except (ImportError, LookupError):
        logging.warning(
            "WordNet is unavailable (needs `pip install nltk` and "
            "`python -m nltk.downloader wordnet`): EDA uses random swap and random deletion "
            "only, no synonym replacement."
        )
        return None
    return _WordNetLexicon(wordnet)


def synonym_replacement(words: list[str], rng: np.random.Generator, lexicon: Lexicon) -> list[str]:
    """One non-stop word that has synonyms, chosen uniformly, replaced by one of them (chosen
    uniformly); its punctuation is kept. Unchanged if no word has synonyms."""
    options = []
    for index, word in enumerate(words):
        core = _WORD.match(word).group(2).lower()
        if core and core not in STOP_WORDS:
            synonyms = [s for s in lexicon(core) if s != core]
            if synonyms:
                options.append((index, synonyms))
    if not options:
        return list(words)
    index, synonyms = options[rng.integers(len(options))]
    before, _, after = _WORD.match(words[index]).groups()
    result = list(words)
    result[index] = before + synonyms[rng.integers(len(synonyms))] + after
    return result


def random_swap(words: list[str], rng: np.random.Generator) -> list[str]:
    """Two distinct positions, chosen uniformly, swap their words."""
    result = list(words)
    if len(words) >= 2:
        i, j = rng.choice(len(words), 2, replace=False)
        result[i], result[j] = result[j], result[i]
    return result


def random_deletion(words: list[str], rng: np.random.Generator) -> list[str]:
    """Each word deleted with probability 0.1; if all would go, one random word is kept."""
    keep = rng.random(len(words)) >= _DELETION_PROB
    if words and not keep.any():
        keep[rng.integers(len(words))] = True
    return [word for word, kept in zip(words, keep, strict=True) if kept]


def eda(caption: str, rng: np.random.Generator, *, lexicon: Lexicon | None) -> str:
    """One EDA operation on `caption`, chosen uniformly among synonym replacement (only when
    `lexicon` is given), random swap and random deletion."""
    words = caption.split()
    ops = [random_swap, random_deletion]
    if lexicon is not None:
        ops.append(functools.partial(synonym_replacement, lexicon=lexicon))
    return " ".join(ops[rng.integers(len(ops))](words, rng))
