"""OpenAI CLIP's byte-level BPE tokenizer, read from its vocabulary `bpe_simple_vocab_16e6.txt.gz`
(shipped beside this file, `OPENAI_VOCAB`, under OpenAI's MIT licence in
`bpe_simple_vocab_16e6.LICENSE`; open_clip and OpenAI's clip ship the same file). Its ids equal
open_clip's `SimpleTokenizer`: the same text clean-up (ftfy's fix where ftfy is installed, HTML
unescaping, whitespace collapsed, lower case), the same pre-tokenising pattern, and rows
`<|startoftext|> ... <|endoftext|> 0...` whose truncation keeps the end token.
"""

import functools
import gzip
import html
import os
import re

import numpy as np
import regex

try:
    import ftfy
except ImportError:  # optional, as in open_clip: it only repairs mis-decoded text
    ftfy = None

OPENAI_VOCAB = os.path.join(os.path.dirname(__file__), "bpe_simple_vocab_16e6.txt.gz")
START, END = "<start_of_text>", "<end_of_text>"  # open_clip's names (OpenAI: <|startoftext|>)
NUM_MERGES = 49152 - 256 - 2  # OpenAI's vocabulary: 256 bytes ×2, the merges, 2 specials
# Specials, contractions, letter runs, single digits, and runs of anything else but spaces.
_PATTERN = regex.compile(
    rf"""{START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+""",
    regex.IGNORECASE,
)


def _byte_chars() -> dict[int, str]:
    """Each byte -> a printable character: printable Latin-1 bytes stand for themselves, the
    others (spaces, controls) for characters from U+0100 on, so no token holds whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    for offset, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + offset)
    return chars


def clean(text: str) -> str:
    """open_clip's clean-up before tokenising: fix, unescape, collapse whitespace, lower."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class BpeTokenizer:
    """The BPE vocabulary file's bytes -> a tokenizer with `Tokenizer`'s interface.

    Ids: the 49,408 of OpenAI's vocabulary; start 49406, end 49407, pad 0 (also the id of "!",
    so pad positions are found from the end token, never by id). No mask token.
    """

    def __init__(self, vocab_gz: bytes):
        self.vocab_gz = vocab_gz
        lines = gzip.decompress(vocab_gz).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(merge) != 2 for merge in merges):
            raise ValueError(
                f"{len(merges)} merge lines where OpenAI's vocabulary has {NUM_MERGES} pairs"
            )
        self._byte_chars = _byte_chars()
        singles = list(self._byte_chars.values())
        vocab = [*singles, *(c + "</w>" for c in singles), *("".join(m) for m in merges)]
        vocab += [START, END]
        self._ids = {piece: i for i, piece in enumerate(vocab)}
        self._pieces = vocab
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._bytes = {c: b for b, c in self._byte_chars.items()}

    def __getstate__(self) -> dict:
        return {"vocab_gz": self.vocab_gz}

    def __setstate__(self, state: dict):
        self.__init__(state["vocab_gz"])

    pad_id = 0
    unk_id = None
    mask_id = None

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_id(self) -> int:
        return self._ids[START]

    @property
    def eos_id(self) -> int:
        return self._ids[END]

    @functools.lru_cache(maxsize=100_000)  # noqa: B019 (one tokenizer per run)
    def _merge(self, word: str) -> tuple[str, ...]:
        """One pre-token (byte characters) -> its BPE pieces, lowest-ranked pair first."""
        if word in (START, END):
            return (word,)
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:], strict=False))
            best = min(pairs, key=lambda pair: self._ranks.get(pair, len(self._ranks)))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def ids(self, text: str) -> list[int]:
        """One text -> its ids, without start and end tokens."""
        out = []
        for word in _PATTERN.findall(clean(text)):
            chars = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
            out += [self._ids[piece] for piece in self._merge(chars)]
        return out

    def encode(self, texts, context_length: int) -> np.ndarray:
        """Texts -> int32 (len(texts), context_length): `start ids end 0...`; too-long texts
        lose their last ids, and the end token stays last."""
        tokens = np.zeros((len(texts), context_length), np.int32)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.ids(text)[: context_length - 2], self.eos_id]
            tokens[row, : len(ids)] = ids
        return tokens

    def decode(self, ids) -> str:
        """One row of ids -> text, up to the end token, without the start token."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        out = bytearray()
        for piece in (self._pieces[i] for i in ids if i != self.bos_id):
            out += bytes(self._bytes[c] for c in piece.removesuffix("</w>"))
            if piece.endswith("</w>"):
                out += b" "
        return out.decode("utf-8", errors="replace").strip()
