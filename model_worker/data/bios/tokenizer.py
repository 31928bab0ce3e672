"""Training the corpus' BPE (pieces.py says why BPE and how pieces keep it exact)."""
from __future__ import annotations

from .pieces import SPECIALS, BioTokenizer, piece_texts
from .population import make_population
from .stream import render_texts

DEFAULT_VOCAB = 2048


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB, sample_people: int = 20_000) -> BioTokenizer:
    """A byte-level BPE trained on one rendering of `sample_people` people (a fixed
    population, seed 0) plus every list value once: the same merges on every call."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = render_texts(make_population(sample_people, seed=0), exposure=0)
    texts += [" ".join(piece_texts().values_text)]
    tok.train_from_iterator(texts, trainer)
    return BioTokenizer(tok)
