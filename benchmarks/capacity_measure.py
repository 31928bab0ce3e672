"""The capacity measure: bits of knowledge a trained model holds about a bioS population,
and exact-match recall of each attribute.

Bits (the value part of the bit-complexity lower bound of Allen-Zhu and Li 2024, arXiv
2404.05405, section 3). Each attribute a of each person i is drawn uniformly from a list
V_a, so a population holds N * sum_a log2|V_a| bits. Teacher-forced on a biography
rendered with *training* templates, the model's summed cross-entropy (nats) over the
tokens of person i's value of a and the "." that ends it is L_ia; the "." makes the
values a prefix-free code, so exp(-L_ia) is a probability over V_a and the model
encodes the values in sum_i L_ia / ln 2 bits. What it must have stored is at least

    bits_a = sum_i ( log2|V_a| - L_ia / ln 2 ) = N log2( |V_a| / e^{p_a} ),  p_a = mean_i L_ia,

and the measure is  bits = sum_g max(0, sum_{a in g} bits_a)  over the groups g: birth
date, birth city, university, major, and employer with the employer's city (the city is
a function of the employer, |V| = 1, and its sentence follows the employer's, so the
pair is scored as one code of log2 263 bits). This is the paper's
N K log2(D^C / e^{p_2}) term for bioS, per attribute. The paper's name term,
N log2((N0 - N) / e^{p_1}) with p_1 the loss on the full name after BOS (N0 = 160M
possible names), is reported beside it (`name_bits`), not in `bits`. With M < N people
scored, the sums are N times the mean over a uniform sample, with its standard error.

Recall: for each person and attribute, "[BOS] Name <template text>" then the value and
".", correct when the model's greedy choice at every value token and at the "." is the
true token (the same as greedy generation producing exactly the value). Templates:
one of the training templates, one of the held-out ones, and a question never trained.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from model_worker.data.bios.evalsets import PROMPT_KINDS, ScoredRows, bio_rows, prompt_rows
from model_worker.data.bios.lists import ATTRIBUTES, attribute_sizes, value_lists
from model_worker.data.bios.stream import ROLE_NAME

N_ROLES = ROLE_NAME + 1
GROUPS = {"birth_date": ("birth_date",), "birth_city": ("birth_city",), "university": ("university",),
          "major": ("major",), "employer": ("employer", "employer_city")}
BITS_FORMULA = ("bits = sum_g max(0, sum_{a in g} N * (log2|V_a| - mean_i L_ia / ln 2)); L_ia: summed "
                "cross-entropy (nats) of person i's value of attribute a and its closing '.', teacher-forced "
                "on a training-template biography; groups g: birth_date, birth_city, university, major, "
                "employer+employer_city; name_bits = N * (log2(N0 - N) - mean_i L_i,name / ln 2)")


@torch.no_grad()
def score(model, rows: ScoredRows, batch_size: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """-> loss [M, N_ROLES] (summed nats over each role's target tokens), wrong [M, N_ROLES]
    (how many of them the greedy choice missed). Roles a row lacks are 0."""
    model.eval()
    losses, wrongs = [], []
    with model.reading(readout="fetch"):
        for tokens, roles in rows.batches(batch_size):
            tokens, roles = tokens.to(device), roles.to(device)
            logits, _ = model(tokens[:, :-1])
            target, role = tokens[:, 1:], roles[:, 1:]
            nll = F.cross_entropy(logits.flatten(0, 1), target.reshape(-1), reduction="none").view_as(target)
            miss = (logits.argmax(-1) != target).double()
            B = tokens.shape[0]
            idx = (torch.arange(B, device=device)[:, None] * N_ROLES + role.clamp_min(0)).reshape(-1)
            keep = (role >= 0).reshape(-1).double()
            loss = torch.zeros(B * N_ROLES, dtype=torch.float64, device=device)
            wrong = torch.zeros(B * N_ROLES, dtype=torch.float64, device=device)
            loss.index_add_(0, idx, nll.reshape(-1).double() * keep)
            wrong.index_add_(0, idx, miss.reshape(-1) * keep)
            losses.append(loss.view(B, N_ROLES).cpu())
            wrongs.append(wrong.view(B, N_ROLES).cpu())
    return torch.cat(losses).numpy(), torch.cat(wrongs).numpy()


def bits_from_losses(loss: np.ndarray, people: int) -> dict:
    """loss: [M, N_ROLES] nats per scored person (M of the population's `people`)."""
    M = loss.shape[0]
    sizes = attribute_sizes()
    per_person = {a: np.log2(sizes[a]) - loss[:, i] / math.log(2) for i, a in enumerate(ATTRIBUTES)}
    by_attribute = {a: float(people * v.mean()) for a, v in per_person.items()}
    group = {g: sum(per_person[a] for a in attrs) for g, attrs in GROUPS.items()}   # [M] bits per person
    n0 = value_lists().num_names
    name = math.log2(n0 - people) - loss[:, ROLE_NAME] / math.log(2)
    total = sum(group.values())
    se = float(people * total.std(ddof=1) / math.sqrt(M)) if 1 < M < people else 0.0
    bits = sum(max(0.0, people * float(v.mean())) for v in group.values())
    information = people * sum(math.log2(s) for s in sizes.values())
    return {"bits": bits, "bits_se": se, "bits_unclipped": people * float(total.mean()),
            "bits_by_group": {g: people * float(v.mean()) for g, v in group.items()},
            "bits_by_attribute": by_attribute, "information_bits": information,
            "fraction_stored": bits / information,
            "mean_value_loss_nats": {a: float(loss[:, i].mean()) for i, a in enumerate(ATTRIBUTES)},
            "name_bits": float(people * name.mean()), "mean_name_loss_nats": float(loss[:, ROLE_NAME].mean()),
            "people_scored": M}


def recall_from_wrong(rows: ScoredRows, wrong: np.ndarray) -> dict:
    """Exact match per (person, attribute) prompt row: no missed token in the value span."""
    missed = wrong[np.arange(len(rows)), rows.attribute]
    right = missed == 0
    by = {a: float(right[rows.attribute == i].mean()) for i, a in enumerate(ATTRIBUTES)}
    return {"recall": float(right.mean()), "by_attribute": by, "n": int(len(rows))}


def measure(model, data, spec, *, bits_people: int = 20_000, recall_people: int = 1_000,
            batch_size: int = 256) -> dict:
    """Bits stored (on up to `bits_people` people, a uniform sample when fewer than N) and
    recall by prompt kind (on `recall_people`), for a trained model."""
    N = len(data.population)
    rng = np.random.default_rng([spec.seed, 7])
    sample = np.sort(rng.choice(N, size=min(N, bits_people), replace=False)) if bits_people else np.arange(N)
    loss, _ = score(model, bio_rows(data.population, data.pieces, spec.seed, sample), batch_size, spec.device)
    out = bits_from_losses(loss, N)
    people = np.sort(rng.choice(N, size=min(N, recall_people), replace=False))
    out["recall"] = {}
    for kind in PROMPT_KINDS:
        rows = prompt_rows(data.population, data.pieces, spec.seed, people, kind)
        _, wrong = score(model, rows, batch_size, spec.device)
        out["recall"][kind] = recall_from_wrong(rows, wrong)
    out["bits_formula"] = BITS_FORMULA
    return out
