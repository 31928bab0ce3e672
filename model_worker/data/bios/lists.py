"""The fixed value lists of the biography corpus, and the information each attribute carries.

bioS (Allen-Zhu and Li 2024, "Physics of Language Models, Part 3.3", arXiv 2404.05405)
draws every attribute uniformly from a list of known size, so a population of N
people carries exactly N * sum_a log2 |V_a| bits of attribute information. The sizes
here are the paper's: 400 first x 400 middle x 1,000 last names (N0 = 160M full
names), birth dates of 12 months x 28 days x 200 years, 200 birth cities, 300
universities, 100 majors, 263 employers; the employer's city is fixed by the employer
(a function of it, so it adds no information about a person).

The lists are made here, deterministically and with no download, from fixed syllable
and word lists and a fixed seed (`LIST_SEED`), independent of the corpus seed: names and
places are invented words, so no fact about them can come from anywhere but the corpus.
No value contains a "." (the sentence end marks where a value stops, which makes the
value codes prefix-free: see `capacity_measure`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

LIST_SEED = 20240405

N_FIRST, N_MIDDLE, N_LAST = 400, 400, 1000
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
DAYS = 28
FIRST_YEAR, YEARS = 1900, 200
N_CITIES, N_UNIVERSITIES, N_MAJORS, N_EMPLOYERS = 200, 300, 100, 263

MAJORS = (
    "Accounting", "Aerospace Engineering", "African Studies", "Agricultural Science", "Anthropology",
    "Applied Mathematics", "Archaeology", "Architecture", "Art History", "Astronomy", "Biochemistry",
    "Bioengineering", "Biology", "Biomedical Engineering", "Biostatistics", "Botany",
    "Business Administration", "Chemical Engineering", "Chemistry", "Civil Engineering", "Classics",
    "Cognitive Science", "Communications", "Comparative Literature", "Computer Engineering",
    "Computer Science", "Construction Management", "Creative Writing", "Criminology", "Dance",
    "Data Science", "Dentistry", "Earth Science", "Ecology", "Economics", "Education",
    "Electrical Engineering", "English Literature", "Environmental Science", "Epidemiology",
    "Film Studies", "Finance", "Fine Arts", "Forestry", "French", "Genetics", "Geography", "Geology",
    "German", "Graphic Design", "History", "Hospitality Management", "Human Resources",
    "Industrial Design", "Industrial Engineering", "Information Systems", "International Relations",
    "Journalism", "Kinesiology", "Labor Studies", "Law", "Linguistics", "Marine Biology", "Marketing",
    "Materials Science", "Mathematics", "Mechanical Engineering", "Media Studies", "Medicine",
    "Microbiology", "Music", "Music Theory", "Neuroscience", "Nuclear Engineering", "Nursing",
    "Nutrition", "Oceanography", "Operations Research", "Pharmacology", "Pharmacy", "Philosophy",
    "Photography", "Physical Therapy", "Physics", "Political Science", "Psychology", "Public Health",
    "Public Policy", "Religious Studies", "Robotics", "Russian", "Social Work", "Sociology",
    "Software Engineering", "Spanish", "Statistics", "Theater", "Urban Planning", "Veterinary Science",
    "Zoology",
)

_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "dr", "fr", "gr", "kr", "pr", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou", "ia")
_CODAS = ("", "", "", "n", "l", "r", "s", "th", "nd", "rt", "m", "ck")
_NAME_ENDS = ("", "a", "o", "en", "el", "is", "an", "et", "ia", "on")
_PLACE_ENDS = ("ville", "ford", "dale", "port", "ton", "burg", "field", "mouth", "haven", "wick")
_UNIVERSITY_FORMS = ("University of {}", "{} State University", "{} Institute of Technology",
                     "{} College", "{} University")
_INDUSTRIES = ("Systems", "Dynamics", "Logistics", "Foods", "Energy", "Labs", "Motors", "Capital",
               "Media", "Pharma", "Robotics", "Textiles", "Airlines", "Bank", "Insurance", "Studios",
               "Networks", "Materials", "Health", "Software", "Chemicals", "Shipping", "Retail",
               "Consulting")
_EMPLOYER_CITIES = 60   # employers sit in the first 60 birth cities


def _words(rng: np.random.Generator, n: int, ends: tuple[str, ...], taken: set[str]) -> list[str]:
    """n new distinct capitalised invented words (two syllables and an ending), none in `taken`."""
    out: list[str] = []
    while len(out) < n:
        parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                 + _CODAS[rng.integers(len(_CODAS))] for _ in range(2)]
        w = ("".join(parts) + ends[rng.integers(len(ends))]).capitalize()
        if 4 <= len(w) <= 12 and w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass(frozen=True)
class ValueLists:
    first: tuple[str, ...]
    middle: tuple[str, ...]
    last: tuple[str, ...]
    cities: tuple[str, ...]
    universities: tuple[str, ...]
    majors: tuple[str, ...]
    employers: tuple[str, ...]
    employer_city: np.ndarray          # [N_EMPLOYERS] index into cities

    @property
    def num_names(self) -> int:
        """N0: the number of possible full names."""
        return len(self.first) * len(self.middle) * len(self.last)


@functools.lru_cache(maxsize=1)
def value_lists() -> ValueLists:
    """The fixed lists (the same on every call and machine)."""
    rng = np.random.default_rng(LIST_SEED)
    taken: set[str] = set()
    first = _words(rng, N_FIRST, _NAME_ENDS, taken)
    middle = _words(rng, N_MIDDLE, _NAME_ENDS, taken)
    last = _words(rng, N_LAST, _NAME_ENDS, taken)
    cities = _words(rng, N_CITIES, _PLACE_ENDS, taken)
    uni_places = _words(rng, N_UNIVERSITIES, ("",), taken)
    universities = [_UNIVERSITY_FORMS[i % len(_UNIVERSITY_FORMS)].format(p) for i, p in enumerate(uni_places)]
    founders = _words(rng, N_EMPLOYERS, ("",), taken)
    employers = [f"{f} {_INDUSTRIES[rng.integers(len(_INDUSTRIES))]}" for f in founders]
    employer_city = rng.integers(0, _EMPLOYER_CITIES, size=N_EMPLOYERS)
    assert len(MAJORS) == N_MAJORS and len(set(MAJORS)) == N_MAJORS
    return ValueLists(tuple(first), tuple(middle), tuple(last), tuple(cities), tuple(universities),
                      MAJORS, tuple(employers), employer_city)


# The attributes in the order a biography's facts are counted; "employer_city" is a
# function of "employer" (its sentence always follows the employer's).
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")


def attribute_sizes() -> dict[str, int]:
    """|V_a| of each attribute, as drawn for a person (employer_city: 1, it is fixed by the employer)."""
    return {"birth_date": len(MONTHS) * DAYS * YEARS, "birth_city": N_CITIES, "university": N_UNIVERSITIES,
            "major": N_MAJORS, "employer": N_EMPLOYERS, "employer_city": 1}


def information_bits_per_person() -> dict[str, float]:
    """log2 |V_a| per attribute: the bits one person's attribute draws carry."""
    return {a: math.log2(n) for a, n in attribute_sizes().items()}
