"""What `learn` is asked to do: the new facts (`TextFact`, `facts_from_lines`), its
settings (`LearnConfig`) and what it reports (`LearnResult`). Measured effects of
the settings: benchmarks/CONTINUAL_NOTES.md."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TextFact:
    """A new fact given as text. With an answer, the loss is on " answer" only;
    without one (a plain sentence), on the whole sentence."""
    prompt: str
    completion: str
    answer: str = ""
    relation: str = "text"
    subject: str = ""

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def facts_from_lines(lines: Sequence[str]) -> list[TextFact]:
    """'prompt<TAB>answer' -> loss on the answer; 'prompt<TAB>answer<TAB>subject' names the
    fact's subject (what its rows are gated on; default: the whole prompt); a plain
    sentence -> loss on all of it. Lines with the same subject and answer are phrasings of
    one fact (its `relation` is the answer)."""
    out = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if "\t" in line:
            prompt, ans, *rest = line.split("\t")
            subject = rest[0].strip() if rest and rest[0].strip() else prompt.rstrip()
            out.append(TextFact(prompt.rstrip(), " " + ans.strip(), ans.strip(), relation=ans.strip(), subject=subject))
        else:
            out.append(TextFact("", line.strip(), subject=line.strip()))
    return out


@dataclass
class LearnConfig:
    method: str = "new_rows"          # a registered method (registry.py; checked when learn starts)
    steps: int = 200
    batch_size: int = 16
    seed: int = 0
    # new_rows
    lr: float | None = None           # None -> the method's default (LearnMethod.default_lr)
    row_optimizer: str | None = None  # None -> per-method default ("adam" for new rows, "sgd" for sparse memory)
    key_lr: float = 0.0               # flat-key lr for new rows (0: keys stay where they were initialised)
    key_margin: float = 3.0           # new key's score on its own queries - best product-key score
    value_init_std: float = 1e-3      # new rows' values start small, so that they change little at first
    max_new_rows: int = 0             # 0 = one per (fact, answer position, head, layer)
    calibrate: bool = True            # cap key scales on old-text queries (needs `background` batches)
    select_bias: bool = True          # large keys + a per-row selection bias from old-text queries
                                      #   (instead of capping the key scale); needs `background`
    select_margin: float = 0.05       # select_bias: how far (x key scale) below the closest old-text query
    contrast: bool = True             # key direction: group mean minus the old-text mean query
    whiten: float = 0.0               # > 0: key direction Sigma^-1 (group mean - old mean) (Fisher's discriminant:
                                      #   away from the directions old-text queries spread in), Sigma the old-text
                                      #   queries' covariance per head + whiten x its mean variance as a ridge
    bg_quantile: float = 0.0          # share of old-text queries a new key may still win (0 = none)
    key_per_phrasing: bool = True     # one key per (fact, phrasing, position, head); False: per fact
    fact_rows: bool = True            # with key_per_phrasing: + one row per (fact, position, head) keyed on
                                      #   the mean over the fact's phrasings (what a new phrasing is nearest)
    answer_rows: bool = True          # rows keyed on the queries that predict the answer tokens
    subject_rows: int = 3             # the subject's last n tokens: what its gate opens on (links, or subject
                                      #   rows: one per subject, token, head; shared by the subject's facts)
    gate_on_subject: bool = True      # with subject_rows and answer_rows: a subject's answer rows are selectable
                                      #   only in a sequence where the subject's gate opened (gating.py) and so
                                      #   take no selection bias: old text, which never names the new subject,
                                      #   cannot read them, however close its queries come to their keys
    subject_links: bool = True        # with gate_on_subject: the gate opens on a chain of links (links.py), one
                                      #   per (phrasing, token, head) of the subject's last subject_rows tokens,
                                      #   where those tokens hold in order; False: on subject rows (read, trained),
                                      #   any one of which in a query's top-k opens it (it then opened on other
                                      #   subjects sharing a token: CONTINUAL_NOTES, 2026-12-07)
    link_margin: float = 0.0          # a link holds where cos(q, key) beats its closest negative query (old text,
                                      #   the new prompts outside the subject's name) by more than this
    detectors: bool = True            # with gate_on_subject, for a subject with several new facts: detector rows
                                      #   keyed on every prompt position of each fact's phrasings (gating.py);
                                      #   the fact whose detectors match best anywhere in the prompt opens its
                                      #   answer rows, so they no longer compete with their siblings'
    detector_prune: float = 0.95      # drop detectors whose cosine with some sibling fact's query reaches this:
                                      #   they tell nothing apart (the subject's own tokens, shared words)
    cue_per_phrasing: bool = True     # (subject rows; links are always per phrasing)
                                      #   subject rows per (subject, phrasing) instead of one per subject (the mean
                                      #   over its phrasings), all of them one cue: a new phrasing's subject query
                                      #   is nearer some phrasing's than their mean
    gated_key_norm: str = "own"       # gated rows' key norms: "own" (margin above the product rows on their own
                                      #   queries), or "median" / "max" of those over the gated rows: in an open
                                      #   context the rows then compete by direction alone
    guard_weight: float = 0.0         # + weight * KL(base || now) on old-text batches (trains new rows only)
    guard_batches: int = 4
    # sparse_memory (Lin et al. 2025)
    top_t: int = 64                   # rows unfrozen per batch
    background_batches: int = 32      # pretraining batches for document frequencies
    # full_finetune / lora (model parameters, AdamW)
    model_lr: float | None = None     # None -> the method's default (LearnMethod.default_lr)
    lora_rank: int = 8
    replay: bool = False              # full_finetune / lora: each step also trains on one old-text batch of
                                      #   `background` (LM loss, weight 1; the batches new rows calibrate on),
                                      #   the standard mitigation of forgetting
    lora_alpha: float = 16.0
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.gated_key_norm not in ("own", "median", "max"):
            raise ValueError(f"gated_key_norm must be 'own', 'median' or 'max', got {self.gated_key_norm!r}")


@dataclass
class LearnResult:
    method: str
    losses: list[float]
    new_ids: torch.Tensor | None = None      # rows appended (new_rows)
    version: int | None = None               # published store version (when publish=True)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
