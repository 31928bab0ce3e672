"""Biographies as piece ids, vectorised over the population, and the training stream.

One *rendering* of a population (an exposure, or an evaluation set) draws per person a
training template for each attribute and an order of the five sentence units (birth
date, birth city, university, major, and employer followed by the employer's city); the
first sentence names the person in full, the others use the pronoun. A biography is

    [BOS] " Anya Briar Forger was born on March 3, 1954." " She works for ..." ... [EOS]

held as a row of piece ids (pieces.py) with -1 for nothing, and `roles` beside it:
which attribute's value (and its closing ".") a piece belongs to, or the name
(`ROLE_NAME`), or none. The whole array for 300k people is a few numpy ops.

Exposure e of seed s uses `np.random.default_rng([s, e])`; evaluation renderings use
exposures >= `EVAL_EXPOSURE_BASE`, which training never reaches.
"""
from __future__ import annotations

import numpy as np

from .lists import ATTRIBUTES
from .pieces import Pieces, piece_texts
from .population import Population
from .templates import TEMPLATES, TRAIN_TEMPLATES, split_template

ROLE_NONE = -1
ROLE_NAME = len(ATTRIBUTES)             # roles 0..5: the attributes' values (+ "."), 6: the name
UNITS = (("birth_date",), ("birth_city",), ("university",), ("major",), ("employer", "employer_city"))
SUBJECT_WIDTH, VALUE_WIDTH = 4, 4
SENTENCE_WIDTH = SUBJECT_WIDTH + 1 + VALUE_WIDTH + 1     # subject, fragment, value, "."
EVAL_EXPOSURE_BASE = 1 << 20

_POSSESSIVE = {a: np.array([split_template(t)[0] == "p" for t in temps]) for a, temps in TEMPLATES.items()}


def _value_columns(pop: Population, ids: dict[str, np.ndarray], attribute: str) -> np.ndarray:
    n = len(pop)
    cols = np.full((n, VALUE_WIDTH), -1, dtype=np.int32)
    if attribute == "birth_date":
        cols[:, 0] = ids["month"][pop.month]
        cols[:, 1] = ids["day"][pop.day]
        cols[:, 2] = ids["comma"][0]
        cols[:, 3] = ids["year"][pop.year]
    elif attribute == "employer_city":
        cols[:, 0] = ids["birth_city"][pop.employer_city]
    else:
        cols[:, 0] = ids[attribute][getattr(pop, attribute)]
    return cols


def name_columns(pop: Population, ids: dict[str, np.ndarray]) -> np.ndarray:
    """[N, 3] piece ids of each full name (" First", " Middle", " Last")."""
    return np.stack([ids["first"][pop.first], ids["middle"][pop.middle], ids["last"][pop.last]], axis=1)


def sentences(pop: Population, ids: dict[str, np.ndarray], attribute: str, template: np.ndarray,
              named: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sentence per person: template[i] of the attribute's list, the subject the
    full name where named[i], else the pronoun. -> piece ids, roles: [N, SENTENCE_WIDTH]."""
    n = len(pop)
    poss = _POSSESSIVE[attribute][template]
    pronoun = np.where(poss, ids["possessive"][pop.gender], ids["subject"][pop.gender])
    out = np.full((n, SENTENCE_WIDTH), -1, dtype=np.int32)
    names = name_columns(pop, ids)
    out[:, 0] = np.where(named, names[:, 0], pronoun)
    out[:, 1] = np.where(named, names[:, 1], -1)
    out[:, 2] = np.where(named, names[:, 2], -1)
    out[:, 3] = np.where(named & poss, ids["apostrophe_s"][0], -1)
    out[:, SUBJECT_WIDTH] = ids[f"fragment:{attribute}"][template]
    out[:, SUBJECT_WIDTH + 1: SUBJECT_WIDTH + 1 + VALUE_WIDTH] = _value_columns(pop, ids, attribute)
    out[:, -1] = ids["dot"][0]
    roles = np.full(out.shape, ROLE_NONE, dtype=np.int8)
    roles[:, :3] = np.where(named[:, None], ROLE_NAME, ROLE_NONE)
    roles[:, SUBJECT_WIDTH + 1:] = ATTRIBUTES.index(attribute)
    roles[out < 0] = ROLE_NONE
    return out, roles


def render(pop: Population, ids: dict[str, np.ndarray], seed: int, exposure: int,
           held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every person's biography in one rendering -> piece ids, roles: [N, 2 + 6 * SENTENCE_WIDTH]
    (BOS, the sentences in this rendering's order, EOS). held_out: templates from the
    held-out part of each list instead of the training part."""
    n = len(pop)
    rng = np.random.default_rng([seed, exposure])
    order = np.argsort(rng.random((n, len(UNITS))), axis=1)     # order[i, j]: the unit i tells j-th
    unit_pos = np.argsort(order, axis=1)                          # where unit u goes
    slot_of: dict[str, np.ndarray] = {}
    for u, unit in enumerate(UNITS):
        base = unit_pos[:, u] + (unit_pos[:, u] > unit_pos[:, len(UNITS) - 1])  # the employer unit has 2 slots
        for k, a in enumerate(unit):
            slot_of[a] = base + k
    body = np.empty((n, len(ATTRIBUTES), SENTENCE_WIDTH), dtype=np.int32)
    body_roles = np.empty(body.shape, dtype=np.int8)
    people = np.arange(n)
    for a in ATTRIBUTES:
        lo, hi = (TRAIN_TEMPLATES, len(TEMPLATES[a])) if held_out else (0, TRAIN_TEMPLATES)
        template = rng.integers(lo, hi, size=n)
        body[people, slot_of[a]], body_roles[people, slot_of[a]] = sentences(
            pop, ids, a, template, named=slot_of[a] == 0)
    edge = np.full((n, 1), -1, dtype=np.int32)
    piece_ids = np.concatenate([edge + 1 + ids["special"][0], body.reshape(n, -1), edge + 1 + ids["special"][1]], 1)
    roles = np.concatenate([edge.astype(np.int8), body_roles.reshape(n, -1), edge.astype(np.int8)], 1)
    return piece_ids, roles


def render_texts(pop: Population, exposure: int = 0, seed: int = 0) -> list[str]:
    """The biographies of one rendering as text (no specials): for the tokenizer's
    training and for tests; the stream itself never goes through text."""
    texts = piece_texts()
    piece_ids, _ = render(pop, texts.ids, seed, exposure)
    strings = np.array(texts.all, dtype=object)
    return ["".join(strings[row[(row >= 0)][1:-1]]) for row in piece_ids]


def rows_to_tokens(pieces: Pieces, piece_ids: np.ndarray, roles: np.ndarray | None = None):
    """Flatten rows of piece ids -> tokens [T] int32 (and each token's role, when given)."""
    flat = piece_ids.reshape(-1)
    tokens = pieces.tokens(flat)
    if roles is None:
        return tokens
    keep = flat >= 0
    return tokens, np.repeat(roles.reshape(-1)[keep], pieces.length[flat[keep]])
