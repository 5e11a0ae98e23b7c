"""Tests for clipjax.data.text_ops: MLM masking and EDA caption augmentation."""

import collections
import sys
import types

import numpy as np
import pytest

from clipjax.data import text_ops

PAD, UNK, BOS, EOS, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, BOS, EOS)
VOCAB = 64
ALLOWED = set(range(5, VOCAB))  # ids a random replacement may take
LENGTH = 32


def caption_tokens(rng, num_words: int, unk_every: int = 0) -> np.ndarray:
    """BOS, `num_words` ids (every `unk_every`-th one UNK), EOS, then PAD up to LENGTH."""
    tokens = np.full(LENGTH, PAD, np.int32)
    words = rng.integers(5, VOCAB, num_words)
    if unk_every:
        words[::unk_every] = UNK
    tokens[: num_words + 2] = [BOS, *words, EOS]
    return tokens


def mask(tokens, seed):
    return text_ops.mlm_mask(
        tokens, np.random.default_rng(seed), mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS
    )


# ---------------------------------------------------------------------------- mlm_mask


def test_mlm_mask_chooses_rounded_share_of_candidates_never_specials():
    rng = np.random.default_rng(0)
    for seed in range(2000):
        tokens = caption_tokens(rng, int(rng.integers(0, LENGTH - 1)), unk_every=4)
        masked, labels = mask(tokens, seed)
        assert masked.dtype == labels.dtype == np.int32
        special = np.isin(tokens, SPECIALS)
        np.testing.assert_array_equal(masked[special], tokens[special])
        assert not labels[special].any()
        chosen = labels != 0
        np.testing.assert_array_equal(labels[chosen], tokens[chosen])
        np.testing.assert_array_equal(masked[~chosen], tokens[~chosen])
        candidates = int((~special).sum())
        expected = max(1, int(np.floor(0.15 * candidates + 0.5))) if candidates else 0
        assert chosen.sum() == expected, (candidates, chosen.sum())


def test_mlm_mask_positions_uniform_and_80_10_10_split():
    # 20 candidates per caption -> 3 chosen, so each position is chosen with probability 0.15:
    # over 2000 captions ~ Binomial(2000, 0.15), mean 300, sd 16; the bounds are 5 sd wide.
    rng = np.random.default_rng(1)
    per_position = np.zeros(LENGTH, int)
    kinds = collections.Counter()
    random_ids = []
    for seed in range(2000):
        tokens = caption_tokens(rng, 20)
        masked, labels = mask(tokens, seed)
        chosen = labels != 0
        per_position += chosen
        for new, old in zip(masked[chosen], tokens[chosen], strict=True):
            if new == MASK:
                kinds["mask"] += 1
            elif new == old:
                kinds["same"] += 1
            else:
                kinds["random"] += 1
                random_ids.append(int(new))
    assert (per_position[[0, 21]] == 0).all() and (per_position[22:] == 0).all()
    assert (np.abs(per_position[1:21] - 300) < 80).all(), per_position
    # 6000 chosen positions: the sd of each share is at most 0.0052, the bounds >= 4 sd.
    # A random draw equals the original with probability 1/59, so "same" gains 0.1/59.
    total = sum(kinds.values())
    assert total == 6000
    assert abs(kinds["mask"] / total - 0.8) < 0.025, kinds
    assert abs(kinds["random"] / total - 0.1 * 58 / 59) < 0.02, kinds
    assert abs(kinds["same"] / total - 0.1 * 60 / 59) < 0.02, kinds
    assert set(random_ids) <= ALLOWED and len(set(random_ids)) >= 55


def test_mlm_mask_edge_cases_and_determinism():
    rng = np.random.default_rng(2)
    only_specials = np.array([BOS, EOS, PAD, PAD], np.int32)
    masked, labels = mask(only_specials, 0)
    np.testing.assert_array_equal(masked, only_specials)
    assert not labels.any()
    one_word = np.array([BOS, 9, EOS, PAD], np.int32)
    assert all(mask(one_word, seed)[1].tolist() == [0, 9, 0, 0] for seed in range(20))
    tokens = caption_tokens(rng, 25)
    for a, b in zip(mask(tokens, 7), mask(tokens, 7), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(mask(tokens, 7)[1], mask(tokens, s)[1]) for s in range(8, 12))
    with pytest.raises(ValueError, match="id 0 must be one of `special_ids`"):
        text_ops.mlm_mask(tokens, rng, mask_id=MASK, vocab_size=VOCAB, special_ids=(UNK, BOS, EOS))


# ---------------------------------------------------------------------------- EDA

CAPTION = "a small red star near the top of the big blue square."
WORDS = CAPTION.split()
FAKE_SYNONYMS = {"small": ["little"], "red": ["crimson", "scarlet"], "the": ["thee"]}


def fake_lexicon(word: str) -> list[str]:
    return FAKE_SYNONYMS.get(word, [])


def is_subsequence(short: list[str], long: list[str]) -> bool:
    remaining = iter(long)
    return all(word in remaining for word in short)


def is_one_swap(words: list[str], original: list[str]) -> bool:
    differ = [i for i, (a, b) in enumerate(zip(words, original, strict=True)) if a != b]
    return len(differ) == 0 or (
        len(differ) == 2
        and words[differ[0]] == original[differ[1]]
        and words[differ[1]] == original[differ[0]]
    )


def test_random_swap_swaps_two_words():
    changed = 0
    for seed in range(100):
        words = text_ops.random_swap(WORDS, np.random.default_rng(seed))
        assert sorted(words) == sorted(WORDS) and is_one_swap(words, WORDS)
        changed += words != WORDS
    assert changed >= 95  # only swapping the two "the"s leaves the caption as it was
    assert text_ops.random_swap(["one"], np.random.default_rng(0)) == ["one"]


def test_random_deletion_removes_only_words_at_rate_0_1():
    deleted = 0
    for seed in range(500):
        words = text_ops.random_deletion(WORDS, np.random.default_rng(seed))
        assert words and is_subsequence(words, WORDS)
        deleted += len(WORDS) - len(words)
    # 6000 words deleted with p = 0.1: sd of the rate 0.0039, bounds 5 sd.
    assert abs(deleted / (500 * len(WORDS)) - 0.1) < 0.02
    # Two words both go with p = 0.01: the fallback keeps one (it runs ~20 times here).
    for seed in range(2000):
        assert len(text_ops.random_deletion(["x", "y"], np.random.default_rng(seed))) >= 1


def test_synonym_replacement_replaces_one_non_stop_word():
    replaced = collections.Counter()
    for seed in range(200):
        words = text_ops.synonym_replacement(WORDS, np.random.default_rng(seed), fake_lexicon)
        differ = [i for i, (a, b) in enumerate(zip(words, WORDS, strict=True)) if a != b]
        assert len(differ) == 1
        replaced[(WORDS[differ[0]], words[differ[0]])] += 1
    # "the" is a stop word; every (word, synonym) pair turns up.
    assert set(replaced) == {("small", "little"), ("red", "crimson"), ("red", "scarlet")}
    # The punctuation of a word stays; no synonyms anywhere leaves the caption as it was.
    lexicon = {"square": ["quadrate"]}.get
    rng = np.random.default_rng(0)
    words = text_ops.synonym_replacement(WORDS, rng, lambda w: lexicon(w, []))
    assert words[-1] == "quadrate." and words[:-1] == WORDS[:-1]
    assert text_ops.synonym_replacement(WORDS, rng, lambda w: []) == WORDS


def classify(caption: str) -> str:
    words = caption.split()
    if len(words) == len(WORDS) and is_one_swap(words, WORDS) and words != WORDS:
        return "swap"
    if is_subsequence(words, WORDS):
        return "deletion"  # or a swap of the two "the"s, which changes nothing
    differ = [i for i, (a, b) in enumerate(zip(words, WORDS, strict=True)) if a != b]
    assert len(differ) == 1, caption
    return "synonym"


def test_eda_chooses_uniformly_among_available_ops():
    caption = CAPTION
    with_lexicon = collections.Counter(
        classify(text_ops.eda(caption, np.random.default_rng(s), lexicon=fake_lexicon))
        for s in range(600)
    )
    # Each op ~ Binomial(600, 1/3): mean 200, sd 11.5; bounds > 4 sd. (The 1 in 66 swaps that
    # exchange the two "the"s change nothing and count as deletions: a shift of ~3.)
    assert all(150 < with_lexicon[k] < 250 for k in ("swap", "deletion", "synonym"))
    without = collections.Counter(
        classify(text_ops.eda(caption, np.random.default_rng(s), lexicon=None)) for s in range(300)
    )
    assert set(without) == {"swap", "deletion"} and min(without.values()) > 100
    first, second = (
        text_ops.eda(caption, np.random.default_rng(5), lexicon=fake_lexicon) for _ in range(2)
    )
    assert first == second


# ---------------------------------------------------------------------------- WordNet


@pytest.fixture
def warnings(monkeypatch):
    """Fresh WordNet lookups for the test, and the warnings they log."""
    logged = []
    monkeypatch.setattr(text_ops.logging, "warning", lambda msg, *a: logged.append(msg % a))
    text_ops._load_wordnet.cache_clear()
    yield logged
    text_ops._load_wordnet.cache_clear()


def test_no_wordnet_warns_once(monkeypatch, warnings):
    monkeypatch.setitem(sys.modules, "nltk", None)  # makes `import nltk` raise ImportError
    assert [text_ops.wordnet_lexicon() for _ in range(3)] == [None] * 3
    assert len(warnings) == 1
    assert (
        "WordNet is unavailable" in warnings[0]
        and "random swap and random deletion" in (warnings[0])
    )


def fake_nltk(monkeypatch, synsets):
    """Installs a stand-in `nltk.corpus.wordnet` whose `synsets` is the given function."""
    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = types.SimpleNamespace(synsets=synsets)
    package = types.ModuleType("nltk")
    package.corpus = corpus
    monkeypatch.setitem(sys.modules, "nltk", package)
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)


def test_wordnet_corpus_missing_warns_once(monkeypatch, warnings):
    def synsets(word):
        raise LookupError("Resource wordnet not found.")

    fake_nltk(monkeypatch, synsets)
    assert text_ops.wordnet_lexicon() is None and text_ops.wordnet_lexicon() is None
    assert len(warnings) == 1


def test_wordnet_lexicon_collects_lemma_names(monkeypatch, warnings):
    def synset(*names):
        lemmas = [types.SimpleNamespace(name=lambda n=n: n) for n in names]
        return types.SimpleNamespace(lemmas=lambda: lemmas)

    table = {"quick": [synset("quick", "speedy"), synset("Fast", "flying_start", "speedy")]}
    fake_nltk(monkeypatch, lambda word: table.get(word, []))
    lexicon = text_ops.wordnet_lexicon()
    assert lexicon("quick") == ("fast", "flying start", "speedy")
    assert lexicon("zzz") == ()
    assert not warnings
