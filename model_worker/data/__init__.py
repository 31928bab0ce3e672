"""Data for the knowledge model: corpus of geographic facts, tokenizers, batch loaders.

    from model_worker.data import build_corpus, CorpusConfig, ByteTokenizer, PackedLoader
    corpus = build_corpus("tiny")            # or CorpusConfig.preset("small", seed=1)
    tok = ByteTokenizer()                    # or build_tokenizer("bpe", corpus.train_texts, 1024)
    loader = PackedLoader(corpus.train_texts, tok, seq_len=128, batch_size=16, seed=0)

Inspect a corpus: ``python -m model_worker.data --preset small [--dump DIR]``.
See corpus.py, tokenizer.py and dataset.py for the details; evaluation lives in
model_worker/evaluate.py.
"""

from .corpus import (CORPUS_PRESETS, RELATIONS, TEMPLATES, Corpus, CorpusConfig, Example, Fact,
                     build_corpus, extract_facts, render, split_template)
from .dataset import (IGNORE_INDEX, Batch, ExampleLoader, PackedLoader, collate_examples,
                      encode_documents, example_batches, packed_batches, split_texts)
from .tokenizer import (BOS_ID, EOS_ID, PAD_ID, SEP_ID, BPETokenizer, ByteTokenizer,
                        build_tokenizer, load_tokenizer, tokenizer_from_dict)

__all__ = [
    "CORPUS_PRESETS", "RELATIONS", "TEMPLATES", "Corpus", "CorpusConfig", "Example", "Fact",
    "build_corpus", "extract_facts", "render", "split_template",
    "IGNORE_INDEX", "Batch", "ExampleLoader", "PackedLoader", "collate_examples",
    "encode_documents", "example_batches", "packed_batches", "split_texts",
    "BOS_ID", "EOS_ID", "PAD_ID", "SEP_ID", "BPETokenizer", "ByteTokenizer",
    "build_tokenizer", "load_tokenizer", "tokenizer_from_dict",
]
