"""The knowledge corpus: facts rendered through templates, split for pretraining,
evaluation on unseen phrasings, and continual learning (templates.py: relations and
phrasings; facts.py: where the facts come from; corpus_config.py: presets).

Splits (all deterministic given `CorpusConfig`):

- templates: ids in ``config.heldout_templates`` are never rendered into training
  text; they are used only for evaluation, so recall is measured on phrasings the
  model never saw;
- facts: a fraction ``config.new_fact_fraction`` of entity groups is held out of
  pretraining entirely ("new facts", for continual learning). The split is by
  *entity group* so that an inverse fact cannot leak a new one (the facts
  "capital_of France = Paris" and "country_of_capital Paris = France" share a group).

`Corpus` fields:

    train          Example list: trained facts x training templates (shuffled)
    eval           trained facts x held-out templates  (recall on unseen phrasing)
    eval_seen      trained facts x one training template (recall on seen phrasing)
    new_train      new facts x training templates       (continual learning data)
    new_eval       new facts x held-out templates
    train_texts, heldout_texts, eval_prompts, eval_answers, eval_fact_types  (lists)

Answers are short and fully determined by subject + relation: subjects with more
than one answer for a relation are dropped (e.g. city names that occur more than
once in geonames, like London or Moscow), and so is any fact whose rendered prompt
would collide with another fact's prompt.

Usage:

    corpus = build_corpus(CorpusConfig.preset("tiny"))
    corpus.train_texts[:2], corpus.eval_prompts[:2], corpus.stats()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field

from .corpus_config import CorpusConfig
from .facts import extract_facts
from .templates import Example, Fact, render


@dataclass
class Corpus:
    config: CorpusConfig
    facts: list[Fact]                 # facts seen in pretraining
    new_facts: list[Fact]             # held out of pretraining (continual learning)
    train: list[Example]
    eval: list[Example]
    eval_seen: list[Example]
    new_train: list[Example]
    new_eval: list[Example]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def train_texts(self) -> list[str]:
        return [e.text for e in self.train]

    @property
    def heldout_texts(self) -> list[str]:
        """Full sentences of the eval examples (held-out templates): held-out loss."""
        return [e.text for e in self.eval]

    @property
    def eval_prompts(self) -> list[str]:
        return [e.prompt for e in self.eval]

    @property
    def eval_answers(self) -> list[str]:
        return [e.answer for e in self.eval]

    @property
    def eval_fact_types(self) -> list[str]:
        return [e.relation for e in self.eval]

    @property
    def relations(self) -> list[str]:
        return sorted({f.relation for f in self.facts + self.new_facts})

    def stats(self) -> dict:
        per_rel = Counter(f.relation for f in self.facts)
        per_rel_new = Counter(f.relation for f in self.new_facts)
        return {
            "facts": len(self.facts), "new_facts": len(self.new_facts),
            "train_examples": len(self.train), "eval_examples": len(self.eval),
            "train_chars": sum(len(t) for t in self.train_texts),
            # longest rendered text / eval prompt in UTF-8 bytes (= byte-tokenizer tokens, without BOS/EOS)
            "max_text_bytes": max((len(e.text.encode()) for e in self._all_examples()), default=0),
            "max_eval_prompt_bytes": max((len(e.prompt.encode()) for e in self.eval + self.new_eval), default=0),
            "facts_per_relation": {r: per_rel[r] for r in self.relations},
            "new_facts_per_relation": {r: per_rel_new[r] for r in self.relations},
            "templates_per_relation": {r: len(self.config.template_ids(r)) for r in self.relations},
            # share of the most common answer: the recall of always guessing it
            "majority_baseline": {r: _majority_share([f.answer for f in self.facts if f.relation == r])
                                  for r in self.relations},
            "heldout_templates": list(self.config.heldout_templates),
            "dropped": dict(self.dropped),
        }

    def _all_examples(self) -> list[Example]:
        return self.train + self.eval + self.eval_seen + self.new_train + self.new_eval

    def fingerprint(self) -> str:
        """sha256 over config and every rendered text: store it with checkpoints."""
        h = hashlib.sha256(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
        for part in (self.train, self.eval, self.new_train, self.new_eval):
            for e in part:
                h.update(e.text.encode())
                h.update(b"\0")
            h.update(b"\1")
        return h.hexdigest()


def _majority_share(answers: list[str]) -> float:
    return round(Counter(answers).most_common(1)[0][1] / len(answers), 4) if answers else 0.0


def build_corpus(config: CorpusConfig | str = "small") -> Corpus:
    """Build the corpus for a config (or a preset name). Deterministic given the config."""
    if isinstance(config, str):
        config = CorpusConfig.preset(config)
    facts, dropped = extract_facts(config)
    rng = random.Random(config.seed)

    groups = sorted({f.group for f in facts})
    n_new = round(config.new_fact_fraction * len(groups))
    new_groups = set(rng.sample(groups, n_new))
    trained = [f for f in facts if f.group not in new_groups]
    new = [f for f in facts if f.group in new_groups]

    train = [render(f, t) for f in trained for t in config.train_template_ids(f.relation)]
    rng.shuffle(train)
    eval_ = [render(f, t) for f in trained for t in config.heldout_template_ids(f.relation)]
    eval_seen = [render(f, rng.choice(config.train_template_ids(f.relation))) for f in trained]
    new_train = [render(f, t) for f in new for t in config.train_template_ids(f.relation)]
    rng.shuffle(new_train)
    new_eval = [render(f, t) for f in new for t in config.heldout_template_ids(f.relation)]
    return Corpus(config=config, facts=trained, new_facts=new, train=train, eval=eval_,
                  eval_seen=eval_seen, new_train=new_train, new_eval=new_eval, dropped=dropped)
