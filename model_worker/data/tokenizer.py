"""Tokenizers that need nothing from the internet.

Both tokenizers share one id layout, so specials never move:

    0..255     the bytes of the UTF-8 text
    256..259   BOS, EOS, PAD, SEP
    260..      BPE merges, in the order they were learned (BPETokenizer only)

API (both classes):

    tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.sep_id
    tok.encode(text, bos=False, eos=False) -> list[int]
    tok.decode(ids) -> str            # specials are dropped; bad UTF-8 is replaced
    tok.save(path); load_tokenizer(path)

Training sequences are ``[BOS] + encode(text) + [EOS]`` (see dataset.py), so a
generator should encode a prompt with ``encode(prompt, bos=True)`` and stop at
``eos_id``. `ByteTokenizer` is the default; `BPETokenizer.train(texts, vocab_size)`
learns merges on the corpus (pre-split on words, GPT-2 style: a word keeps its
leading space, so " Paris" is one unit), fast enough for a few MB of text.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

N_BYTES = 256
BOS_ID, EOS_ID, PAD_ID, SEP_ID = 256, 257, 258, 259
N_BASE = 260  # bytes + specials
SPECIALS = {"<bos>": BOS_ID, "<eos>": EOS_ID, "<pad>": PAD_ID, "<sep>": SEP_ID}

# words with their leading space, runs of digits, punctuation runs, whitespace
_PRETOKENIZE = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+(?!\S)|\s+|_+")


class ByteTokenizer:
    """UTF-8 bytes plus four specials; vocab_size = 260."""

    bos_id, eos_id, pad_id, sep_id = BOS_ID, EOS_ID, PAD_ID, SEP_ID

    @property
    def vocab_size(self) -> int:
        return N_BASE

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def _bytes(self, ids) -> bytes:
        return bytes(i for i in ids if i < N_BYTES)

    def decode(self, ids) -> str:
        return self._bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "byte"}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


class BPETokenizer(ByteTokenizer):
    """Byte-level BPE; merges[i] = (left id, right id) makes token id 260 + i."""

    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        # bytes each token stands for, for decoding
        self.token_bytes = [bytes([i]) for i in range(N_BYTES)] + [b""] * (N_BASE - N_BYTES)
        for a, b in self.merges:
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return N_BASE + len(self.merges)

    # -- training

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        """Learn vocab_size - 260 merges from an iterable of strings.

        Incremental: pair counts live in a dict, with a lazy max-heap over them, and an
        index pair -> words; a merge touches only the words containing its pair.
        Ties break on the smaller pair, so training is deterministic.
        """
        n_merges = vocab_size - N_BASE
        if n_merges < 0:
            raise ValueError(f"vocab_size must be >= {N_BASE}")
        word_freq: Counter = Counter()
        for t in texts:
            word_freq.update(_PRETOKENIZE.findall(t))
        words = [list(w.encode("utf-8")) for w in word_freq]
        freqs = list(word_freq.values())

        pair_count: defaultdict = defaultdict(int)
        where: defaultdict = defaultdict(set)
        for wi, w in enumerate(words):
            for p in zip(w, w[1:]):
                pair_count[p] += freqs[wi]
                where[p].add(wi)
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)

        merges = []
        while len(merges) < n_merges and heap:
            neg, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg:      # stale entry
                continue
            if -neg < 2:
                break
            new_id = N_BASE + len(merges)
            merges.append(pair)
            changed = Counter()
            for wi in list(where[pair]):
                w, f = words[wi], freqs[wi]
                for p in zip(w, w[1:]):
                    changed[p] -= f
                out, i = [], 0
                while i < len(w):
                    if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                        out.append(new_id)
                        i += 2
                    else:
                        out.append(w[i])
                        i += 1
                words[wi] = out
                for p in zip(out, out[1:]):
                    changed[p] += f
                    where[p].add(wi)
            for p, d in changed.items():
                if d:
                    pair_count[p] += d
                    if pair_count[p] > 0:
                        heapq.heappush(heap, (-pair_count[p], p))
                    else:
                        del pair_count[p]
            pair_count.pop(pair, None)
            where.pop(pair, None)
        return cls(merges)

    # -- encoding

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        ids = list(word.encode("utf-8"))
        while len(ids) > 1:
            best = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, 1 << 30))
            rank = self.ranks.get(best)
            if rank is None:
                break
            new_id, out, i = N_BASE + rank, [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        if len(self._cache) < 1_000_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [BOS_ID] if bos else []
        for w in _PRETOKENIZE.findall(text):
            ids.extend(self._encode_word(w))
        if eos:
            ids.append(EOS_ID)
        return ids

    def _bytes(self, ids) -> bytes:
        tb = self.token_bytes
        return b"".join(tb[i] for i in ids if i < len(tb))

    def to_dict(self) -> dict:
        return {"type": "bpe", "merges": [list(m) for m in self.merges]}


def tokenizer_from_dict(d: dict) -> ByteTokenizer:
    if d["type"] == "byte":
        return ByteTokenizer()
    if d["type"] == "bpe":
        return BPETokenizer(d["merges"])
    raise ValueError(f"unknown tokenizer type {d['type']!r}")


def load_tokenizer(path: str | Path) -> ByteTokenizer:
    return tokenizer_from_dict(json.loads(Path(path).read_text()))


def build_tokenizer(kind: str = "byte", texts=None, vocab_size: int = 1024) -> ByteTokenizer:
    """'byte' -> ByteTokenizer(); 'bpe' -> BPETokenizer trained on texts."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if texts is None:
            raise ValueError("a BPE tokenizer needs texts to train on")
        return BPETokenizer.train(texts, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}")
