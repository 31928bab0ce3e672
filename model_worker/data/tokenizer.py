"""The byte tokenizer: UTF-8 bytes plus four specials, nothing to download or train.

Id layout (fixed: checkpoints store token ids, so specials never move):

    0..255     the bytes of the UTF-8 text
    256..259   BOS, EOS, PAD, SEP

API:

    tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.sep_id
    tok.encode(text, bos=False, eos=False) -> list[int]
    tok.decode(ids) -> str            # specials are dropped; bad UTF-8 is replaced
    tok.save(path); load_tokenizer(path); tokenizer_from_dict(tok.to_dict())

Training sequences are ``[BOS] + encode(text) + [EOS]`` (see dataset.py), so a
generator should encode a prompt with ``encode(prompt, bos=True)`` and stop at
``eos_id``.

A BPE tokenizer was here once; no default path used it (training always used the
byte tokenizer, so every checkpoint records {"type": "byte"}), and it was removed.
A larger corpus that needs one should use the `tokenizers` library, keeping the
byte ids above.
"""

from __future__ import annotations

import json
from pathlib import Path

N_BYTES = 256
BOS_ID, EOS_ID, PAD_ID, SEP_ID = 256, 257, 258, 259
N_BASE = 260  # bytes + specials
SPECIALS = {"<bos>": BOS_ID, "<eos>": EOS_ID, "<pad>": PAD_ID, "<sep>": SEP_ID}


class ByteTokenizer:
    """UTF-8 bytes plus four specials; vocab_size = 260."""

    bos_id, eos_id, pad_id, sep_id = BOS_ID, EOS_ID, PAD_ID, SEP_ID

    @property
    def vocab_size(self) -> int:
        return N_BASE

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < N_BYTES).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "byte"}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


def tokenizer_from_dict(d: dict) -> ByteTokenizer:
    if d["type"] == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer type {d['type']!r} (only 'byte' is supported)")


def load_tokenizer(path: str | Path) -> ByteTokenizer:
    return tokenizer_from_dict(json.loads(Path(path).read_text()))
