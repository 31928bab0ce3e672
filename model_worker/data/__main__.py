"""Command line: python -m model_worker.data --preset small [--dump DIR]."""

import argparse
import dataclasses
import json
from pathlib import Path

from .corpus import build_corpus
from .corpus_config import CORPUS_PRESETS, CorpusConfig


def main(argv=None) -> None:
    """python -m model_worker.data --preset small [--dump DIR]: stats, samples, JSONL dump."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--preset", default="small", choices=sorted(CORPUS_PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", type=Path, help="write train/eval/new_train/new_eval .jsonl here")
    args = ap.parse_args(argv)
    corpus = build_corpus(CorpusConfig.preset(args.preset, seed=args.seed))
    print(json.dumps(corpus.stats(), indent=1))
    for e in corpus.train[:5] + corpus.eval[:3]:
        print(f"{e.relation:18s} t{e.template_id}  {e.prompt!r} -> {e.completion!r}")
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for part in ("train", "eval", "eval_seen", "new_train", "new_eval"):
            with open(args.dump / f"{part}.jsonl", "w") as fh:
                for e in getattr(corpus, part):
                    fh.write(json.dumps(dataclasses.asdict(e), ensure_ascii=False) + "\n")
        print(f"wrote {args.dump}")


if __name__ == "__main__":
    main()
