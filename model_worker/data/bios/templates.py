"""Sentence templates of the biography corpus: several paraphrases per attribute, some
held out of training, and question prompts.

Every template names the person first and ends with the value, then ".":
``{s}`` is the subject (the full name, or "She" / "He"), ``{p}`` its possessive
(the name + "'s", or "Her" / "His"); the value follows the template's text after a
space. The first `TRAIN_TEMPLATES` of each list are used in training; the rest are
held out: recall on them asks whether a fact learnt in one phrasing is known in
another. Question prompts (never trained) end where the answer would start.

Ids are positions in these lists: append, never reorder.
"""
from __future__ import annotations

TRAIN_TEMPLATES = 6

TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{s} was born on", "{p} birthday falls on", "{s} came into this world on",
        "{p} date of birth is", "{s} celebrates a birthday each year on", "{s} entered life on",
        # held out
        "{s} was brought into the world on", "{p} birth date is recorded as",
    ),
    "birth_city": (
        "{s} was born in", "{s} hails from", "{s} is a native of", "{p} hometown is",
        "{s} spent early childhood in", "{s} was raised in",
        "{s} first saw the light of day in", "{p} place of birth is",
    ),
    "university": (
        "{s} studied at", "{s} graduated from", "{s} received a degree from",
        "{s} completed an education at", "{p} alma mater is", "{s} was a student at",
        "{s} earned a diploma from", "{s} attended classes at",
    ),
    "major": (
        "{s} majored in", "{s} studied the field of", "{p} area of study was",
        "{s} earned a degree in", "{s} focused the studies on", "{p} major was",
        "{s} specialized in", "{s} chose to study",
    ),
    "employer": (
        "{s} works for", "{s} is employed by", "{p} employer is", "{s} has a job at",
        "{s} earns a living at", "{s} is on the staff of",
        "{s} draws a salary from", "{p} workplace is",
    ),
    "employer_city": (
        "{s} works in", "{p} office is located in", "{s} commutes to work in",
        "{p} job is based in", "{s} goes to the office in", "{p} workplace sits in",
        "{s} is employed in the city of", "{p} company is headquartered in",
    ),
}

QUESTIONS: dict[str, str] = {
    "birth_date": "Question: When was {n} born? Answer:",
    "birth_city": "Question: In which city was {n} born? Answer:",
    "university": "Question: Which university did {n} attend? Answer:",
    "major": "Question: What did {n} study? Answer:",
    "employer": "Question: Which company does {n} work for? Answer:",
    "employer_city": "Question: In which city does {n} work? Answer:",
}

PRONOUNS = {"subject": ("She", "He"), "possessive": ("Her", "His")}   # by a person's gender (0, 1)


def split_template(template: str) -> tuple[str, str]:
    """("s" or "p", the text after the subject slot): "{p} hometown is" -> ("p", " hometown is")."""
    if template.startswith("{s}"):
        return "s", template[3:]
    if template.startswith("{p}"):
        return "p", template[3:]
    raise ValueError(f"template {template!r} must start with {{s}} or {{p}}")


def num_held_out(attribute: str) -> int:
    return len(TEMPLATES[attribute]) - TRAIN_TEMPLATES
