"""A population of N people with bioS attributes, drawn uniformly and independently from
the fixed lists (lists.py), vectorised: 300k people take well under a second.

Full names are unique: N distinct codes are drawn from the N0 = 400 x 400 x 1000
possible (first, middle, last) triples without replacement. Gender (which pronoun the
biography uses) is a fair coin; it is not counted as knowledge.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np

from .lists import DAYS, MONTHS, N_CITIES, N_EMPLOYERS, N_MAJORS, N_UNIVERSITIES, YEARS, value_lists


@dataclass(frozen=True)
class Population:
    seed: int
    first: np.ndarray           # [N] int32 indices into value_lists().first
    middle: np.ndarray
    last: np.ndarray
    gender: np.ndarray          # [N] int8: 0 she, 1 he
    month: np.ndarray           # [N] 0..11
    day: np.ndarray             # [N] 0..27 (day of the month - 1)
    year: np.ndarray            # [N] 0..199 (year - FIRST_YEAR)
    birth_city: np.ndarray
    university: np.ndarray
    major: np.ndarray
    employer: np.ndarray

    def __len__(self) -> int:
        return len(self.first)

    @property
    def employer_city(self) -> np.ndarray:
        return value_lists().employer_city[self.employer]

    def value_index(self, attribute: str) -> np.ndarray:
        """[N] the index of each person's value in the attribute's list (birth_date: a
        single code month * DAYS * YEARS + day * YEARS + year)."""
        if attribute == "birth_date":
            return (self.month.astype(np.int64) * DAYS + self.day) * YEARS + self.year
        return getattr(self, attribute)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in fields(self):
            v = getattr(self, f.name)
            h.update(np.ascontiguousarray(v).tobytes() if isinstance(v, np.ndarray) else str(v).encode())
        return h.hexdigest()[:16]


def make_population(n: int, seed: int = 0) -> Population:
    """N people drawn from `seed` (the same people for the same (n, seed) on any machine)."""
    lists = value_lists()
    if not 1 <= n <= lists.num_names:
        raise ValueError(f"population size must be in [1, {lists.num_names}], got {n}")
    rng = np.random.default_rng([seed, 0xB105])
    codes = rng.choice(lists.num_names, size=n, replace=False)
    nm, nl = len(lists.middle), len(lists.last)

    def draw(k: int) -> np.ndarray:
        return rng.integers(0, k, size=n).astype(np.int32)

    return Population(
        seed=seed,
        first=(codes // (nm * nl)).astype(np.int32), middle=((codes // nl) % nm).astype(np.int32),
        last=(codes % nl).astype(np.int32), gender=rng.integers(0, 2, size=n).astype(np.int8),
        month=draw(len(MONTHS)), day=draw(DAYS), year=draw(YEARS), birth_city=draw(N_CITIES),
        university=draw(N_UNIVERSITIES), major=draw(N_MAJORS), employer=draw(N_EMPLOYERS))


def subset(pop: Population, idx: np.ndarray) -> Population:
    """The people idx (in that order), same seed."""
    return Population(pop.seed, *(getattr(pop, f.name)[idx] for f in fields(pop) if f.name != "seed"))
