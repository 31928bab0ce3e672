"""The relations of the knowledge corpus and their phrasings, and how a fact becomes text.

A *fact* is a (subject, relation, answer) triple, e.g. ("France", "capital_of", "Paris").
Each relation has a few paraphrase *templates*; a template is a sentence with the
subject slot ``{s}`` anywhere and the answer slot ``{a}`` at the end (only trailing
punctuation may follow it). Rendering a fact through a template gives an `Example`:

    prompt     = "The capital of France is"       # everything before " {a}"
    completion = " Paris."                        # what a model must generate
    answer     = "Paris"                          # what recall compares against
    text       = prompt + completion              # what the model trains on
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

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

_ANSWER_SLOT = re.compile(r" \{a\}([.?!]?)$")


@functools.lru_cache(maxsize=None)
def split_template(template: str) -> tuple[str, str]:
    """'The capital of {s} is {a}.' -> ('The capital of {s} is', '.') (prefix, suffix)."""
    m = _ANSWER_SLOT.search(template)
    if m is None or template.count("{s}") != 1:
        raise ValueError(f"template must contain one {{s}} and end in ' {{a}}': {template!r}")
    return template[: m.start()], m.group(1)


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
