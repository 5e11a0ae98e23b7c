"""OpenAI's BPE tokenizer against open_clip's ids (tests/fixtures/open_clip/bpe.json, made by
tools/make_open_clip_fixtures.py with open_clip's SimpleTokenizer and ftfy)."""

import gzip
import json
import os
import pickle

import numpy as np
import pytest

from clipjax.data import bpe
from clipjax.data import tokenizer as tokenizer_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "open_clip")
VOCAB = bpe.OPENAI_VOCAB  # shipped in the package, with its licence beside it


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_lib.load(VOCAB)


def test_the_vocabulary_ships_with_its_licence_and_loads_by_name(tokenizer):
    folder = os.path.dirname(bpe.__file__)
    with open(os.path.join(folder, "bpe_simple_vocab_16e6.LICENSE")) as f:
        assert "MIT License" in f.read()
    assert tokenizer_lib.load("openai").vocab_gz == tokenizer.vocab_gz


def test_ids_equal_open_clip(tokenizer):
    with open(os.path.join(FIXTURES, "bpe.json")) as f:
        fixture = json.load(f)
    for length, rows in fixture["ids"].items():
        got = tokenizer.encode(fixture["captions"], int(length))
        assert got.dtype == np.int32
        for caption, ids, want in zip(fixture["captions"], got, rows, strict=True):
            assert ids.tolist() == want, caption


def test_special_ids_and_truncation(tokenizer):
    assert isinstance(tokenizer, bpe.BpeTokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (49408, 49406, 49407)
    row = tokenizer.encode(["one two three four five six"], 5)[0]
    assert row[0] == tokenizer.bos_id and row[-1] == tokenizer.eos_id  # the end token stays
    assert row[1:4].tolist() == tokenizer.ids("one two three")
    assert 0 in tokenizer.ids("wow!~")  # a "!" piece is id 0, the pad id (in bpe.json too)


def test_decode_inverts_encode_up_to_clean_up(tokenizer):
    for text in ["A photo of a CAT.", "café  naïve\tdon't", "12,345 km/h"]:
        decoded = tokenizer.decode(tokenizer.encode([text], 77)[0])
        assert decoded.replace(" ", "") == bpe.clean(text).replace(" ", "")


def test_pickles_as_its_vocabulary(tokenizer):
    copy = pickle.loads(pickle.dumps(tokenizer))
    text = ["a pickled tokenizer, for Grain's worker processes"]
    np.testing.assert_array_equal(copy.encode(text, 20), tokenizer.encode(text, 20))
    assert len(pickle.dumps(tokenizer)) < 2 * os.path.getsize(VOCAB)


def test_bad_vocabulary_file(tmp_path):
    path = tmp_path / "bpe.txt.gz"
    path.write_bytes(gzip.compress(b"not a vocabulary"))
    with pytest.raises(ValueError) as e:
        tokenizer_lib.load(str(path))
    assert str(e.value).startswith(f"{path} does not load as a OpenAI BPE vocabulary (")
