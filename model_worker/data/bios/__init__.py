"""bioS: synthetic biographies for the knowledge-capacity benchmark (issue 22), after
Allen-Zhu and Li 2024, "Physics of Language Models, Part 3.3" (arXiv 2404.05405).

    from model_worker.data.bios.population import make_population
    from model_worker.data.bios.tokenizer import train_tokenizer
    from model_worker.data.bios.pieces import tokenize_pieces
    from model_worker.data.bios.batches import BioStream

    pop = make_population(100_000, seed=0)          # N people, unique names, uniform attributes
    pieces = tokenize_pieces(train_tokenizer(2048))  # every string a biography is made of, tokenized once
    stream = BioStream(pop, pieces, seed=0, exposures=100, seq_len=256, batch_size=128)
    batch = stream.batch()                           # inputs / targets [128, 256]

Modules: lists.py (the fixed value lists and the bits each attribute carries),
templates.py (paraphrases, held-out ones, questions), population.py (the people),
pieces.py (the BPE tokenizer API and the tokenized pieces), tokenizer.py (training the
BPE), stream.py (renderings as piece ids, vectorised), batches.py (the packed training
stream, resumable), evalsets.py (what the capacity measure scores).
"""
