"""The corpus' BPE tokenizer and its *pieces*: every string a biography is made of,
tokenized once.

Why BPE: with the project's byte tokenizer a biography is ~330 tokens; with a
2,048-token BPE trained on the corpus it is ~80, so the same 100 exposures per person
cost ~4x less compute (the capacity runs are bound by tokens, not by parameters). The
tokenizer comes from the `tokenizers` library (Hugging Face), trained here on a
rendering of the corpus: byte-level pre-tokenization (GPT-2's split of words, numbers,
punctuation and a leading space), so it needs no download and never fails on a byte.

A piece is a string that starts at a pre-token boundary (a word with its leading
space, "'s", ",", "."), so tokenizing a biography piece by piece gives the same ids as
tokenizing its text whole (tests check it): a stream of millions of biographies is then
assembled from piece ids with numpy alone (stream.py), never through the tokenizer.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .lists import DAYS, FIRST_YEAR, MONTHS, YEARS, value_lists
from .templates import PRONOUNS, QUESTIONS, TEMPLATES, split_template

SPECIALS = ("<bos>", "<eos>", "<pad>")


class BioTokenizer:
    """A trained `tokenizers.Tokenizer` with the project's tokenizer API (encode with
    bos / eos, decode, vocab_size, bos_id / eos_id / pad_id, to_dict)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.bos_id, self.eos_id, self.pad_id = (tokenizer.token_to_id(s) for s in SPECIALS)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        return self._tok.to_str()

    def to_dict(self) -> dict:
        return tokenizer_meta(self)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "BioTokenizer":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(Path(path).read_text()))


@dataclass
class PieceTexts:
    """Every piece's text, by kind; a piece id is its position in `all`."""
    all: list[str]
    values_text: list[str]     # every list value once (for the tokenizer's training text)
    ids: dict[str, np.ndarray]  # kind -> [n] piece ids


def piece_texts() -> PieceTexts:
    lists = value_lists()
    texts: list[str] = []
    ids: dict[str, np.ndarray] = {}

    def add(kind: str, strings) -> None:
        ids[kind] = np.arange(len(texts), len(texts) + len(strings), dtype=np.int32)
        texts.extend(strings)

    add("special", list(SPECIALS))                      # bos, eos, pad (encoded as their ids)
    add("first", [" " + s for s in lists.first])
    add("middle", [" " + s for s in lists.middle])
    add("last", [" " + s for s in lists.last])
    add("apostrophe_s", ["'s"])
    add("subject", [" " + p for p in PRONOUNS["subject"]])
    add("possessive", [" " + p for p in PRONOUNS["possessive"]])
    add("dot", ["."])
    add("comma", [","])
    add("month", [" " + m for m in MONTHS])
    add("day", [f" {d}" for d in range(1, DAYS + 1)])
    add("year", [f" {FIRST_YEAR + y}" for y in range(YEARS)])
    add("birth_city", [" " + s for s in lists.cities])
    add("university", [" " + s for s in lists.universities])
    add("major", [" " + s for s in lists.majors])
    add("employer", [" " + s for s in lists.employers])
    for a, temps in TEMPLATES.items():
        add(f"fragment:{a}", [split_template(t)[1] for t in temps])
    for a, q in QUESTIONS.items():
        before, after = q.split("{n}")
        add(f"question:{a}", [" " + before.rstrip(), after])
    values = [t[1:] for k in ("birth_city", "university", "major", "employer") for t in texts[ids[k][0]:ids[k][-1] + 1]]
    return PieceTexts(texts, values, ids)


@dataclass
class Pieces:
    """Piece texts tokenized: piece p is tokens flat[start[p]: start[p] + length[p]]."""
    texts: PieceTexts
    flat: np.ndarray       # [total] int32 token ids
    start: np.ndarray      # [P] int64
    length: np.ndarray     # [P] int64
    tokenizer: BioTokenizer

    @property
    def ids(self) -> dict[str, np.ndarray]:
        return self.texts.ids

    def tokens(self, piece_ids: np.ndarray) -> np.ndarray:
        """Flat piece ids (-1 = nothing) -> the concatenation of their tokens [T] int32."""
        p = piece_ids[piece_ids >= 0]
        lengths = self.length[p]
        ends = np.cumsum(lengths)
        idx = np.repeat(self.start[p] - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
        return self.flat[idx]


def tokenize_pieces(tokenizer: BioTokenizer) -> Pieces:
    texts = piece_texts()
    special = {s: i for s, i in zip(SPECIALS, (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id))}
    encoded = [[special[t]] if t in special else ids
               for t, ids in zip(texts.all, tokenizer.encode_many(texts.all))]
    length = np.array([len(e) for e in encoded], dtype=np.int64)
    if (length == 0).any():
        raise ValueError("a piece encoded to no token")
    start = np.concatenate([[0], np.cumsum(length)[:-1]])
    flat = np.fromiter((i for e in encoded for i in e), dtype=np.int32, count=int(length.sum()))
    return Pieces(texts, flat, start, length, tokenizer)


def tokenizer_meta(tokenizer: BioTokenizer) -> dict:
    return {"type": "bios-bpe", "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256(),
            "library": "tokenizers " + __import__("tokenizers").__version__}
