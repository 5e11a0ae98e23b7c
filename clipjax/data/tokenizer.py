"""Tokenizers: a sentencepiece model (loaded, or trained small on the training captions), or
OpenAI's byte-level BPE vocabulary (`clipjax.data.bpe`)."""

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from clipjax import paths
from clipjax.data import bpe

MASK_PIECE = "[MASK]"
_WORKDIR_MODEL = "tokenizer.model"
_WORKDIR_BPE = "bpe_simple_vocab_16e6.txt.gz"


class Tokenizer:
    """A serialized sentencepiece model with CLIP-style fixed-length encoding.

    Ids: pad 0, unk 1, bos 2, eos 3 (for models trained here); `mask_id` is the `[MASK]` piece,
    or None if the model has none. Pickles as the model bytes (Grain workers are spawned).
    """

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()

    def __getstate__(self) -> dict:
        return {"model_proto": self.model_proto}

    def __setstate__(self, state: dict):
        self.__init__(state["model_proto"])

    @property
    def mask_id(self) -> int | None:
        piece_id = self._sp.piece_to_id(MASK_PIECE)
        return None if piece_id == self._sp.unk_id() else piece_id

    def encode(self, texts: Sequence[str], context_length: int) -> np.ndarray:
        """Texts -> int32 (len(texts), context_length), rows `BOS tokens EOS PAD...`.

        Too-long texts lose their last tokens, so EOS always ends the row's non-pad tokens.
        """
        tokens = np.full((len(texts), context_length), self.pad_id, np.int32)
        for row, text in enumerate(texts):
            # One call per text: sentencepiece's batch call starts threads, slow for small lists.
            ids = [self.bos_id, *self._sp.encode(text)[: context_length - 2], self.eos_id]
            tokens[row, : len(ids)] = ids
        return tokens

    def decode(self, ids: Sequence[int]) -> str:
        """One row of token ids -> text, ignoring BOS, PAD and everything after EOS."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._sp.decode([i for i in ids if i not in (self.bos_id, self.pad_id)])


def train(captions: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a BPE sentencepiece model in memory (lower-cased; `[MASK]` reserved).

    BPE, as in CLIP: on small corpora such as `shapes` it keeps whole words where unigram
    splits them. `vocab_size` is an upper bound: small corpora may give fewer pieces.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        normalization_rule_name="nmt_nfkc_cf",
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=[MASK_PIECE],
        minloglevel=2,
    )
    return Tokenizer(model.getvalue())


OPENAI = "openai"  # the name of the BPE vocabulary that ships with clipjax


def load(path: str):
    """A sentencepiece `.model`, OpenAI's BPE vocabulary `bpe_simple_vocab_16e6.txt.gz` (any
    `.gz`), or "openai" (the copy of it in this package) -> its tokenizer."""
    if path == OPENAI:
        path = bpe.OPENAI_VOCAB
    if not epath.Path(path).is_file():
        raise ValueError(
            f"no tokenizer at {path!r}. Point it at an existing sentencepiece .model or "
            "OpenAI's bpe_simple_vocab_16e6.txt.gz (or 'openai', the copy clipjax ships), or "
            "set it to '' to train one from the training captions."
        )
    data = epath.Path(path).read_bytes()
    path = os.fspath(path)
    try:
        return bpe.BpeTokenizer(data) if path.endswith(".gz") else Tokenizer(data)
    except Exception as e:  # noqa: BLE001 - sentencepiece and gzip raise many kinds
        kind = "OpenAI BPE vocabulary" if path.endswith(".gz") else "sentencepiece model"
        raise ValueError(f"{path} does not load as a {kind} ({e}).") from None


def saved_in(workdir: str) -> bool:
    """Whether a run in `workdir` saved its tokenizer there."""
    return any((paths.path(workdir) / n).is_file() for n in (_WORKDIR_MODEL, _WORKDIR_BPE))


def save(tokenizer, workdir: str):
    """Write `tokenizer` into `workdir` (a resumed run reads it back); returns it."""
    if isinstance(tokenizer, bpe.BpeTokenizer):
        name, data = _WORKDIR_BPE, tokenizer.vocab_gz
    else:
        name, data = _WORKDIR_MODEL, tokenizer.model_proto
    workdir = paths.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(workdir / name, data)  # a crash never leaves a truncated file behind
    return tokenizer


def load_or_train(tokenizer_config, workdir: str, captions: Iterable[str]) -> Tokenizer:
    """The tokenizer of a run (`tokenizer_config` is `config.data.tokenizer`).

    - `path` set: load that model (sentencepiece, or OpenAI's BPE vocabulary `.txt.gz`, or
      "openai" for the copy of it in this package).
    - `path` empty: reuse the one saved in `workdir` (a resumed run), else train one with
      `vocab_size` on `captions` and save it there.
    """
    path = tokenizer_config.path
    if path:
        return load(path)
    for name in (_WORKDIR_MODEL, _WORKDIR_BPE):
        if (saved := paths.path(workdir) / name).is_file():
            return load(saved)
    return save(train(captions, tokenizer_config.vocab_size), workdir)
