"""Continual learning: new knowledge = new rows, trained alone (DESIGN.md section 1, point 2).

`learn` teaches a trained model new facts without touching what it knows:

1. run the frozen model over the new text and keep, at every scored position
   (the answer tokens), each knowledge layer's query per head;
2. append one flat row per (new fact, phrasing, answer position, head): its key
   is the mean direction of those queries (minus the old-text mean), and its
   selection must not reach old text. Two ways: cap the key's scale so that no
   old-text query ranks it in its top-k (the first version; the row then scores
   barely above the product rows and gets a small share of the softmax weight),
   or (`select_bias`) scale the key to score `key_margin` above the best product
   row and give the row a negative selection bias, the largest that keeps the
   old-text queries off it (the row then takes most of the weight wherever it is
   read). Optionally also rows per (fact, position, head) over all its phrasings
   (`fact_rows`) and per (subject, phrasing, last tokens, head) at the subject in
   the prompt (`subject_rows`, `cue_per_phrasing`); values start small;
   with `gate_on_subject` (the default) the subject rows are the *cue* of their
   subject's answer rows, which are *gated* on it (interface.py: cues and
   gates): an answer row can be selected only in a sequence where one of its
   subject's rows was selected at or before that position, so it needs no
   selection bias. Why: at the answer, no linear function of the query tells a
   new fact's unseen phrasing from an old fact's (`novelty_probe`: AUC ~0.53),
   so any bias that keeps old facts off the rows also keeps the new phrasing
   off; the subject's own tokens do tell them apart, and the gate carries that
   decision from the subject to the answer. A subject with several new facts
   also gets `detectors` (never read; interface.py: detectors), keyed on every
   prompt position of each fact's phrasings with a bias at the tie with its
   sibling facts' phrasings: each fact's answer rows are gated on the fact, which
   opens where its subject's gate is open and its evidence so far beats its
   siblings'. Why: the query at the answer names the relation on an unseen
   phrasing for about a third of the facts, the prompt's positions for about
   three quarters;
3. freeze every existing row (`table.set_frozen`), the detectors and every model
   parameter (`requires_grad_(False)`), train only the new rows (values, and
   their keys at `key_lr`) with the store's sparse optimizer;
4. publish a new store version. The model weights do not change (tested bitwise).

The baselines it is compared with (benchmarks/continual.py), with the same data
and step budget:

- "sparse_memory": sparse memory finetuning (Lin et al. 2025, arXiv 2510.15103):
  per batch, rank existing rows by TF-IDF (term frequency = reads in the batch,
  document frequency = share of pretraining sequences that read the row), unfreeze
  only the top-t, train them with SGD; model frozen.
- "full_finetune": every model parameter (AdamW) and every row (the store's optimizer).
- "lora": low-rank adapters on the attention and expert weights (`LoRADelta`);
  rows and base weights frozen.

    from model_worker.continual import LearnConfig, learn
    result = learn(model, table, corpus.new_train, tok, LearnConfig(steps=300))
    result.version, result.new_ids, result.losses

Row optimizers: the store applies row updates with its own optimizer config; for an
in-process table `row_optimizer` swaps it for the duration of a run (a remote table
keeps its own and a warning says so).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from store_service import kernels
from store_service.config import OptimizerConfig
from store_service.interface import KnowledgeTable
from store_service.optimizer import RowState

from .data import Batch, ByteTokenizer, ExampleLoader
from .model import Transformer

METHODS = ("new_rows", "sparse_memory", "full_finetune", "lora")


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
    method: str = "new_rows"          # one of METHODS
    steps: int = 200
    batch_size: int = 16
    seed: int = 0
    # new_rows
    lr: float | None = None           # None -> per-method default (DEFAULT_LR)
    row_optimizer: str | None = None  # None -> per-method default ("adam" for new rows, "sgd" for sparse memory)
    key_lr: float = 0.0               # flat-key lr for new rows (0: keys stay where they were initialised)
    key_margin: float = 3.0           # new key's score on its own queries - best product-key score
    value_init_std: float = 1e-3      # "values small"
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
    subject_rows: int = 3             # + rows keyed on the queries at the last n tokens of the subject
                                      #   (one per subject, token, head; shared by the subject's facts)
    gate_on_subject: bool = True      # with subject_rows and answer_rows: the subject rows are the cue of
                                      #   their subject's answer rows, which are selectable only in a sequence
                                      #   where that cue fired (interface.py: cues and gates) and so take no
                                      #   selection bias: old text, which never names the new subject, cannot
                                      #   read them, however close its queries come to their keys
    detectors: bool = True            # with gate_on_subject, for a subject with several new facts: detector rows
                                      #   keyed on every prompt position of each fact's phrasings (interface.py:
                                      #   detectors); the fact whose detectors match best anywhere in the prompt
                                      #   opens its answer rows, so they no longer compete with their siblings'
    detector_prune: float = 0.95      # drop detectors whose cosine with some sibling fact's query reaches this:
                                      #   they tell nothing apart (the subject's own tokens, shared words)
    cue_per_phrasing: bool = True     # subject rows per (subject, phrasing) instead of one per subject (the mean
                                      #   over its phrasings), all of them one cue: a new phrasing's subject query
                                      #   is nearer some phrasing's than their mean (cue fires on 96% of the
                                      #   benchmark's unseen phrasings against 79%)
    gated_key_norm: str = "own"       # gated rows' key norms: "own" (margin above the product rows on their own
                                      #   queries), or "median" / "max" of those over the gated rows: in an open
                                      #   context the rows then compete by direction alone
    guard_weight: float = 0.0         # + weight * KL(base || now) on old-text batches (trains new rows only)
    guard_batches: int = 4
    # sparse_memory (Lin et al. 2025)
    top_t: int = 64                   # rows unfrozen per batch
    background_batches: int = 32      # pretraining batches for document frequencies
    # full_finetune / lora (model parameters, AdamW)
    model_lr: float | None = None     # None -> DEFAULT_LR
    lora_rank: int = 8
    lora_alpha: float = 16.0
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.gated_key_norm not in ("own", "median", "max"):
            raise ValueError(f"gated_key_norm must be 'own', 'median' or 'max', got {self.gated_key_norm!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


# Per-method learning rates, each the best new-fact recall of three tried on the continual
# benchmark's second base (training seed 1; ties by forgetting): new rows 0.3 / 1 / 3, full
# finetuning 1e-4 / 3e-4 / 1e-3, LoRA 1e-3 / 3e-3 / 1e-2 (benchmarks/continual.py); sparse memory
# (SGD) from the tiny-corpus base.
DEFAULT_LR = {"new_rows": 1.0, "sparse_memory": 100.0, "full_finetune": 1e-3, "lora": 1e-3}


@dataclass
class LearnResult:
    method: str
    losses: list[float]
    new_ids: torch.Tensor | None = None      # rows appended (new_rows)
    version: int | None = None               # published store version (when publish=True)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


# -- row optimizer ---------------------------------------------------------------------

@contextlib.contextmanager
def row_optimizer(table: KnowledgeTable, kind: str, lr: float, key_lr: float | None = None,
                  bias_step: float | None = None) -> Iterator[bool]:
    """Use this sparse optimizer for rows (and flat-key balancing step) while inside.
    Only in-process shards can be reconfigured; yields whether it was applied."""
    from store_service.shard import Shard

    shards = getattr(table, "shards", [])
    if not shards or not all(isinstance(s, Shard) for s in shards):
        warnings.warn("row_optimizer: not an in-process table; the store's own optimizer is used")
        yield False
        return
    saved = []
    for s in shards:
        with s._use(0) as st, st.lock:  # noqa: SLF001 - the shard's serving state, in-process only
            saved.append((st, st.config))
            opt = OptimizerConfig(kind=kind, lr=lr, key_lr=key_lr, betas=st.config.optimizer.betas,
                                  eps=st.config.optimizer.eps)
            st.config = dataclasses.replace(st.config, optimizer=opt,
                                            bias_step=st.config.bias_step if bias_step is None else bias_step)
            if kind == "adam" and st.opt.m is None:
                st.opt = RowState.zeros("adam", st.values.shape[0], st.values.shape[1], st.device)
                st.key_opt = RowState.zeros("adam", st.keys.shape[0], st.keys.shape[1], st.device)
    try:
        yield True
    finally:
        for st, cfg in saved:
            with st.lock:
                st.config = cfg


# -- LoRA --------------------------------------------------------------------------------

class LoRADelta(nn.Module):
    """A parametrization W -> W + (alpha / r) A @ B for a weight [..., a, b]
    (a Linear's [out, in], or stacked experts [E, a, b]). B starts at zero, so
    the adapted model starts equal to the base one."""

    def __init__(self, shape: Sequence[int], rank: int, alpha: float):
        super().__init__()
        *batch, a, b = shape
        self.A = nn.Parameter(torch.randn(*batch, a, rank) * a ** -0.5)
        self.B = nn.Parameter(torch.zeros(*batch, rank, b))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.A @ self.B).to(w.dtype)


def lora_targets(model: Transformer) -> list[tuple[nn.Module, str]]:
    """Attention (wqkv, wo) and expert weights (routed w1/w2/w3, shared expert)."""
    out = []
    for block in model.layers:
        out += [(block.attention.wqkv, "weight"), (block.attention.wo, "weight")]
        ffn = block.ffn
        if ffn is None:
            continue
        if hasattr(ffn, "experts"):
            out += [(ffn.experts, n) for n in ("w1", "w2", "w3")]
            if ffn.shared is not None:
                out += [(m, "weight") for m in ffn.shared.modules() if isinstance(m, nn.Linear)]
        else:
            out += [(m, "weight") for m in ffn.modules() if isinstance(m, nn.Linear)]
    return out


def add_lora(model: Transformer, rank: int = 8, alpha: float = 16.0) -> list[nn.Parameter]:
    """Attach LoRA adapters; returns their parameters (the only trainable ones)."""
    params = []
    for mod, name in lora_targets(model):
        delta = LoRADelta(getattr(mod, name).shape, rank, alpha).to(getattr(mod, name).device)
        parametrize.register_parametrization(mod, name, delta)
        params += [delta.A, delta.B]
    return params


def merge_lora(model: Transformer) -> None:
    """Fold the adapters into the weights (W <- W + scale A B) and drop them."""
    for mod, name in lora_targets(model):
        if parametrize.is_parametrized(mod, name):
            parametrize.remove_parametrizations(mod, name, leave_parametrized=True)


# -- queries of the new text ---------------------------------------------------------------

@torch.no_grad()
def collect_queries(model: Transformer, batches: Sequence[Batch], groups: Sequence[Sequence[int]],
                    at: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per knowledge layer (block index) -> (queries [P, h, d_k], group key [P, 2]) at
    every scored position: key = (group of the example, index of the position among
    the example's scored positions). groups[b][row] is the group of batch b's row.
    at[b] = (mask [B, S] bool, label [B, S] int64): these positions instead, keyed
    (group, label)."""
    kls = {i: b.knowledge for i, b in enumerate(model.layers) if b.knowledge is not None}
    captured: dict[int, torch.Tensor] = {}
    hooks = [kl.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0]))
             for i, kl in kls.items()]
    out: dict[int, list] = {i: [] for i in kls}
    was = model.training
    model.eval()
    try:
        from .generate import readout_mode
        with readout_mode(model, "fetch"):
            for b, (batch, grp) in enumerate(zip(batches, groups)):
                model(batch.inputs)
                if at is None:
                    scored = batch.targets != -100                            # [B, S]
                    pos = (scored.cumsum(1) - 1)[scored]                      # index among scored
                else:
                    scored, label = at[b]
                    pos = label[scored]
                g = torch.as_tensor(grp, dtype=torch.int64)[:, None].expand_as(scored)[scored]
                for i, kl in kls.items():
                    x = captured[i]                                           # [B, S, D]
                    B, S, _ = x.shape
                    q = kl.q_norm(kl.wq(x).view(B, S, kl.n_heads, kl.d_k)).float()
                    out[i].append((q[scored], torch.stack([g, pos], 1)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {i: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for i, v in out.items() if v}


def product_top_scores(kl, q: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """q [T, d_k] -> scores of the best k product-key rows [T, k] (with the layer's biases)."""
    ca, cb = kl.codebooks()
    half = kl.d_k // 2
    s, _ = kernels.product_key_search(q[:, :half].contiguous(), q[:, half:].contiguous(), ca.detach(),
                                      cb.detach(), k or kl.k, kl.bias_a, kl.bias_b, kl._ablated)
    return s


@torch.no_grad()
def init_new_keys(model: Transformer, queries: dict[int, tuple[torch.Tensor, torch.Tensor]],
                  margin: float, max_rows: int = 0, seed: int = 0,
                  background: dict[int, torch.Tensor] | None = None, contrast: bool = True,
                  bg_quantile: float = 0.0, select_bias: bool = False, select_margin: float = 0.05,
                  whiten: float = 0.0) -> tuple[torch.Tensor, dict]:
    """One key per (layer, group, position, head) -> keys [M, d_k], info.

    Direction: the mean of the group's normalised queries, minus (contrast) the mean
    of the background queries of that head, so that what every context shares does
    not count; `whiten` > 0 turns that difference by the inverse covariance of the
    background queries (ridge `whiten` x their mean variance), so that the key scores
    low along the directions old text varies in most. Scale: `margin` above the best product-key score of the group's
    queries; with `background` (old-text queries [P, h, d_k] per layer) capped so
    that the key's score on (1 - bg_quantile) of them stays below their k-th best
    product score: the row is then not selected in old contexts, and old answers
    cannot change. Rows that cannot reach their own queries under that cap are kept
    (harmless) and counted in info["unreachable"].

    select_bias (needs `background`): no cap on the scale, so that the key scores
    `margin` above the best product row and the row takes most of the softmax weight
    where it is selected; instead each row gets a (negative) selection bias, the
    largest that keeps the same old-text queries from selecting it: selection
    becomes a threshold on q.u, the softmax weight is unchanged by the bias. The
    biases are returned in info["bias"] [M].

    info["row_groups"] [M] and info["row_layers"] [M]: each key's group (the first
    column of the queries' group key) and knowledge layer."""
    keys, biases, info = [], [], {}
    row_groups, row_layers = [], []
    F = torch.nn.functional
    for layer, (q, gk) in queries.items():
        kl = model.layers[layer].knowledge
        P, h, d = q.shape
        uniq, inv = torch.unique(gk, dim=0, return_inverse=True)             # [U, 2], [P]
        U = uniq.shape[0]
        row_groups.append(uniq[:, 0].repeat_interleave(h))
        row_layers.append(torch.full((U * h,), layer, dtype=torch.int64))
        mean = torch.zeros(U, h, d).index_add_(0, inv, F.normalize(q, dim=-1))
        mean = mean / torch.bincount(inv, minlength=U).clamp_min(1)[:, None, None].float()
        bg = background.get(layer) if background else None
        if contrast and bg is not None:
            mean = mean - F.normalize(bg, dim=-1).mean(0)[None]                 # [U, h, d]
        if whiten > 0 and bg is not None:
            nb = F.normalize(bg, dim=-1)
            c = nb - nb.mean(0)
            cov = torch.einsum("phd,phe->hde", c, c) / max(c.shape[0] - 1, 1)    # [h, d, d]
            ridge = whiten * cov.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(d)
            mean = torch.linalg.solve(cov + ridge, mean.permute(1, 2, 0)).permute(2, 0, 1)   # [U, h, d]
        u = F.normalize(mean, dim=-1)
        own = torch.zeros(U, h).index_add_(0, inv, (q * u[inv]).sum(-1))
        own = own / torch.bincount(inv, minlength=U).clamp_min(1)[:, None].float()   # mean q.u in the group
        best = product_top_scores(kl, q.reshape(P * h, d), 1).reshape(P, h)
        best_g = torch.full((U, h), float("-inf")).scatter_reduce(0, inv[:, None].expand(P, h), best, "amax")
        scale = (best_g + margin) / own.clamp_min(1e-3)
        cap = torch.full_like(scale, float("inf"))
        own_kth = product_top_scores(kl, q.reshape(P * h, d), kl.k)[:, -1].reshape(P, h)
        if select_bias and bg is not None:
            qb = bg.reshape(-1, d)
            kth = product_top_scores(kl, qb, kl.k)[:, -1]
            flat_k = (u * scale[..., None]).reshape(U * h, d)
            bs = []
            for c in range(0, flat_k.shape[0], 512):
                slack = kth[:, None] - qb @ flat_k[c:c + 512].T                  # [Pb, c]: bias that ties
                bs.append(slack.quantile(bg_quantile, dim=0) if bg_quantile > 0 else slack.min(0).values)
            # below the tie with the closest old-text query by select_margin x the key's scale:
            # a safety margin for old text the background sample does not contain
            bias = (torch.cat(bs) - select_margin * scale.reshape(-1)).reshape(U, h)
            mine = (q * (u * scale[..., None])[inv]).sum(-1) + bias[inv]         # [P, h] own selection score
            hit = torch.zeros(U, h).index_add_(0, inv, (mine > own_kth).float())
            hit = hit / torch.bincount(inv, minlength=U).clamp_min(1)[:, None].float()
            keys.append((u * scale[..., None]).reshape(U * h, d))
            biases.append(bias.reshape(-1))
            info[f"layer{layer}"] = {"groups": U, "queries": P, "heads": h, "mean_scale": float(scale.mean()),
                                     "mean_bias": float(bias.mean()),
                                     "mean_best_product_score": float(best_g.mean()),
                                     "own_queries_selecting": float(hit.mean()),
                                     "unreachable": float((hit == 0).float().mean())}
            continue
        if bg is not None:
            qb = bg.reshape(-1, d)                                              # every head's old queries
            kth = product_top_scores(kl, qb, kl.k)[:, -1]                       # [Pb] score needed to be selected
            flat_u = u.reshape(U * h, d)
            caps = []
            for c in range(0, flat_u.shape[0], 512):
                sc = qb @ flat_u[c:c + 512].T                                   # [Pb, c]
                ratio = torch.where(sc > 0, kth[:, None].clamp_min(1e-3) / sc, torch.full_like(sc, float("inf")))
                caps.append(ratio.quantile(bg_quantile, dim=0) if bg_quantile > 0 else ratio.min(0).values)
            cap = 0.98 * torch.cat(caps).reshape(U, h)
        scale = torch.minimum(scale, cap)
        reach = own * scale                                                     # mean own score after the cap
        kth_g = torch.full((U, h), float("inf")).scatter_reduce(0, inv[:, None].expand(P, h), own_kth, "amin")
        keys.append((u * scale[..., None]).reshape(U * h, d))
        info[f"layer{layer}"] = {"groups": U, "queries": P, "heads": h, "mean_scale": float(scale.mean()),
                                 "mean_best_product_score": float(best_g.mean()),
                                 "capped_by_background": float((cap < (best_g + margin) / own.clamp_min(1e-3)).float().mean()),
                                 "unreachable": float((reach <= kth_g).float().mean()),
                                 "above_best_product": float((reach > best_g).float().mean())}
    keys = torch.cat(keys)
    bias = torch.cat(biases) if biases else None
    groups, layers = torch.cat(row_groups), torch.cat(row_layers)
    if max_rows and keys.shape[0] > max_rows:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(keys.shape[0], generator=g)[:max_rows]
        keys, groups, layers = keys[pick], groups[pick], layers[pick]
        bias = bias[pick] if bias is not None else None
    info["row_groups"], info["row_layers"] = groups, layers
    if bias is not None:
        info["bias"] = bias.float().contiguous()
    return keys.float().contiguous(), info


def subject_positions(examples: Sequence, tok: ByteTokenizer, n_last: int, batch_size: int,
                      per_phrasing: bool = False
                      ) -> tuple[list[Batch], list[list[int]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every example once, with the input positions of the last `n_last` tokens of its
    subject in the prompt (labelled 0 = last token, 1 = the one before, ...) and its
    group = the subject, or the (subject, prompt) pair with per_phrasing (negative ids, so
    they never collide with answer groups). Examples whose prompt does not contain their
    subject contribute no position."""
    from .data import collate_examples
    answer_only = all(getattr(e, "prompt", "") for e in examples)
    names: dict[tuple, int] = {}
    batches, groups, at = [], [], []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        batch = collate_examples(chunk, tok, answer_only)
        mask = torch.zeros(batch.inputs.shape, dtype=torch.bool)
        label = torch.zeros(batch.inputs.shape, dtype=torch.int64)
        grp = []
        for i, e in enumerate(chunk):
            subj = getattr(e, "subject", "")
            grp.append(-1 - names.setdefault(_cue_group(e, per_phrasing), len(names)))
            j = e.prompt.rfind(subj) if subj else -1
            if j < 0:
                continue
            first = len(tok.encode(e.prompt[:j], bos=True))                  # input index of its first token
            last = len(tok.encode(e.prompt[:j + len(subj)], bos=True)) - 1   # ... and of its last
            for off in range(min(n_last, last - first + 1)):
                mask[i, last - off], label[i, last - off] = True, off
        batches.append(batch)
        groups.append(grp)
        at.append((mask, label))
    return batches, groups, at


@torch.no_grad()
def background_queries(model: Transformer, batches: Sequence[Batch], max_per_layer: int = 65536,
                       seed: int = 0) -> dict[int, torch.Tensor]:
    """Old-text queries per knowledge layer [P, h, d_k] (every position), subsampled."""
    groups = [[0] * b.inputs.shape[0] for b in batches]
    full = [Batch(b.inputs, torch.zeros_like(b.targets)) for b in batches]   # every position "scored"
    out = {}
    g = torch.Generator().manual_seed(seed)
    for layer, (q, _) in collect_queries(model, full, groups).items():
        if q.shape[0] > max_per_layer:
            q = q[torch.randperm(q.shape[0], generator=g)[:max_per_layer]]
        out[layer] = q
    return out


# -- data ------------------------------------------------------------------------------------

def _loader(examples: Sequence, tok: ByteTokenizer, cfg: LearnConfig) -> ExampleLoader:
    answer_only = all(getattr(e, "prompt", "") for e in examples)
    return ExampleLoader(examples, tok, min(cfg.batch_size, len(examples)), seed=cfg.seed, answer_only=answer_only)


def _group_key(e, per_phrasing: bool) -> tuple:
    """What makes an example's group: its fact (subject, relation), and its phrasing with per_phrasing."""
    return (e.subject, e.relation) + ((e.prompt,) if per_phrasing else ())


def _group_batches(examples: Sequence, tok: ByteTokenizer, batch_size: int, per_phrasing: bool = False
                   ) -> tuple[list[Batch], list[list[int]]]:
    """All examples once; group = the fact (subject, relation) of each row (and its
    phrasing, with per_phrasing)."""
    from .data import collate_examples
    answer_only = all(getattr(e, "prompt", "") for e in examples)
    names: dict[tuple, int] = {}
    gid = [names.setdefault(_group_key(e, per_phrasing), len(names)) for e in examples]
    batches, groups = [], []
    for s in range(0, len(examples), batch_size):
        batches.append(collate_examples(examples[s:s + batch_size], tok, answer_only))
        groups.append(gid[s:s + batch_size])
    return batches, groups


def group_subjects(examples: Sequence, per_phrasing: bool = False) -> list[str]:
    """The subject of each of `_group_batches`' groups (list index = group id)."""
    names: dict[tuple, str] = {}
    for e in examples:
        names.setdefault(_group_key(e, per_phrasing), e.subject)
    return list(names.values())


def _cue_group(e, per_phrasing: bool) -> tuple:
    subject = getattr(e, "subject", "")
    return (subject, getattr(e, "prompt", "")) if per_phrasing else (subject,)


def subject_names(examples: Sequence, per_phrasing: bool = False) -> list[str]:
    """The subject of each of `subject_positions`' groups: group -1 - i is subject_names[i]."""
    groups: dict[tuple, str] = {}
    for e in examples:
        groups.setdefault(_cue_group(e, per_phrasing), getattr(e, "subject", ""))
    return list(groups.values())


def cue_gates(row_groups: torch.Tensor, row_layers: torch.Tensor, first_id: int,
              answer_subjects: dict[int, str], cue_subjects: dict[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cue and gate labels for rows about to be appended at ids first_id + [0, M): the
    rows of a subject's subject positions become its cue (label: the id of its first
    such row in that layer, unique across the table), the answer rows of its facts are
    gated on it. Rows whose subject has no cue row in their layer stay ungated."""
    M = row_groups.numel()
    cue, gate = torch.full((M,), -1, dtype=torch.int64), torch.full((M,), -1, dtype=torch.int64)
    label: dict[tuple[int, str], int] = {}
    for r in range(M):
        g, layer = int(row_groups[r]), int(row_layers[r])
        if g in cue_subjects:
            cue[r] = label.setdefault((layer, cue_subjects[g]), first_id + r)
    for r in range(M):
        g, layer = int(row_groups[r]), int(row_layers[r])
        if g in answer_subjects and (layer, answer_subjects[g]) in label:
            gate[r] = label[(layer, answer_subjects[g])]
    return cue, gate


@dataclass
class NewRows:
    """The rows `learn` appends for new_rows, before any training: keys [M, d_k], selection
    bias [M] (None without select_bias), cue / gate labels [M] (None when not gated), and
    per row its group (`_group_batches` / `subject_positions` ids; per-fact groups offset by
    FACT_GROUP, detectors by DETECTOR_GROUP) and knowledge layer."""
    keys: torch.Tensor
    bias: torch.Tensor | None
    cue: torch.Tensor | None
    gate: torch.Tensor | None
    groups: torch.Tensor
    layers: torch.Tensor
    info: dict


# per-fact groups get their own ids (offset far above any per-phrasing group id) so that
# init_new_keys makes one row for each, beside the per-phrasing rows; detectors' groups are
# their fact's id offset by DETECTOR_GROUP
FACT_GROUP = 1 << 40
DETECTOR_GROUP = 2 << 40


def prompt_positions(examples: Sequence, tok: ByteTokenizer, batch_size: int
                     ) -> tuple[list[Batch], list[list[int]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """`collect_queries` arguments: every example once, at every input position of its prompt
    after BOS (labelled with the position), grouped by fact (`_group_batches`' per-fact ids).
    Examples without a prompt (plain sentences) contribute no position."""
    batches, groups = _group_batches(examples, tok, batch_size, False)
    at = []
    for b in batches:
        scored = b.targets != -100
        last = scored.int().argmax(1)                      # input index of the prompt's last token
        pos = torch.arange(b.inputs.shape[1])[None].expand_as(scored)
        mask = (pos >= 1) & (pos <= last[:, None]) & scored.any(1, keepdim=True)
        at.append((mask, pos))
    return batches, groups, at


@torch.no_grad()
def fact_detectors(queries: dict[int, tuple[torch.Tensor, torch.Tensor]], fact_subjects: Sequence[str],
                   prune: float) -> dict[int, tuple[torch.Tensor, ...]]:
    """Detector rows from `prompt_positions` queries (layer -> (q [P, h, d_k], (fact, position)
    [P, 2])): per layer (keys [R, d_k], bias [R], fact [R], position [R]). One candidate per
    query and head, its key the query's direction; its bias minus its best cosine with any
    query (any head) of a sibling fact (same subject, another fact), so that its evidence
    cos(q, key) + bias is positive only where a prompt looks more like this fact's phrasing
    than any sibling's ever did. Facts without siblings get none, nor do candidates whose
    best sibling cosine reaches `prune` (but for each fact's least ambiguous one)."""
    F = torch.nn.functional
    out = {}
    subject_of = {s: i for i, s in enumerate(dict.fromkeys(fact_subjects))}
    for layer, (q, gk) in queries.items():
        P, h, d = q.shape
        u = F.normalize(q.float(), dim=-1).reshape(P * h, d)
        fact, pos = gk[:, 0].repeat_interleave(h), gk[:, 1].repeat_interleave(h)
        subj = torch.tensor([subject_of[fact_subjects[f]] for f in fact.tolist()], dtype=torch.int64)
        theta = torch.full((P * h,), float("inf"))
        for sid in torch.unique(subj).tolist():
            rows = torch.nonzero(subj == sid).flatten()
            f = fact[rows]
            if torch.unique(f).numel() < 2:
                continue
            cos = (u[rows] @ u[rows].T).masked_fill(f[:, None] == f[None], float("-inf"))
            theta[rows] = cos.max(1).values
        keep = theta < prune
        # ... but every fact with siblings keeps its least ambiguous candidate, so that it takes
        # part in its subject's contest (its own phrasings still clear the bias)
        has = torch.isfinite(theta)
        if bool(has.any()):
            f, t = fact[has], theta[has]
            best = torch.full((int(f.max()) + 1,), float("inf")).scatter_reduce(0, f, t, "amin")
            keep |= has & (theta == best[fact.clamp_max(best.numel() - 1)])
        out[layer] = (u[keep], -theta[keep], fact[keep], pos[keep])
    return out


def plan_new_rows(model: Transformer, examples: Sequence, tok: ByteTokenizer, cfg: LearnConfig,
                  background: Sequence[Batch] | None, first_id: int) -> NewRows:
    """The new rows for `examples` (keys, bias, labels), to be appended at ids first_id + [0, M)."""
    batches, groups = _group_batches(examples, tok, cfg.batch_size, cfg.key_per_phrasing)
    bgq = background_queries(model, background) if background and cfg.calibrate else None
    queries = collect_queries(model, batches, groups) if cfg.answer_rows else {}
    if cfg.answer_rows and cfg.fact_rows and cfg.key_per_phrasing:
        fq = collect_queries(model, *_group_batches(examples, tok, cfg.batch_size, False))
        queries = {i: (torch.cat([q, fq[i][0]]), torch.cat([g, fq[i][1] + torch.tensor([FACT_GROUP, 0])]))
                   for i, (q, g) in queries.items()}
    if cfg.subject_rows:
        sq = collect_queries(model, *subject_positions(examples, tok, cfg.subject_rows, cfg.batch_size,
                                                       cfg.cue_per_phrasing))
        queries = {i: (torch.cat([queries[i][0], q]), torch.cat([queries[i][1], g])) if i in queries else (q, g)
                   for i, (q, g) in sq.items()}
    keys, info = init_new_keys(model, queries, cfg.key_margin,
                               cfg.max_new_rows, cfg.seed, background=bgq, contrast=cfg.contrast,
                               bg_quantile=cfg.bg_quantile, select_bias=cfg.select_bias,
                               select_margin=cfg.select_margin, whiten=cfg.whiten)
    bias = info.pop("bias", None)
    row_groups, row_layers = info.pop("row_groups"), info.pop("row_layers")
    cue = gate = None
    if cfg.gate_on_subject and cfg.subject_rows and cfg.answer_rows:
        answer = dict(enumerate(group_subjects(examples, cfg.key_per_phrasing)))
        if cfg.fact_rows and cfg.key_per_phrasing:
            answer.update({FACT_GROUP + g: s for g, s in enumerate(group_subjects(examples, False))})
        cues = {-1 - i: s for i, s in enumerate(subject_names(examples, cfg.cue_per_phrasing))}
        cue, gate = cue_gates(row_groups, row_layers, first_id, answer, cues)
        if bias is not None:
            bias = bias.masked_fill(gate >= 0, 0.0)     # the gate keeps old text off them instead
        if cfg.gated_key_norm != "own" and bool((gate >= 0).any()):
            norms = keys[gate >= 0].norm(dim=-1)
            target = norms.median() if cfg.gated_key_norm == "median" else norms.max()
            keys[gate >= 0] = keys[gate >= 0] * (target / norms.clamp_min(1e-6))[:, None]
        if cfg.detectors:
            extra = _add_detectors(model, examples, tok, cfg, row_groups, row_layers, cue, gate, first_id + keys.shape[0])
            if extra is not None:
                dk, db, dc, dg, dgroups, dlayers = extra
                keys, cue, gate = torch.cat([keys, dk]), torch.cat([cue, dc]), torch.cat([gate, dg])
                bias = torch.cat([bias if bias is not None else torch.zeros(row_groups.numel()), db])
                row_groups, row_layers = torch.cat([row_groups, dgroups]), torch.cat([row_layers, dlayers])
        detector = (cue >= 0) & (gate >= 0)
        # counted as the store counts them: gated rows include the detectors
        info.update(cue_rows=int(((cue >= 0) & ~detector).sum()), gated_rows=int((gate >= 0).sum()),
                    detector_rows=int(detector.sum()),
                    labels=_label_names(subject_names(examples, cfg.cue_per_phrasing), examples, cue, row_groups))
    return NewRows(keys, bias, cue, gate, row_groups, row_layers, info)


def _add_detectors(model: Transformer, examples: Sequence, tok: ByteTokenizer, cfg: LearnConfig,
                   row_groups: torch.Tensor, row_layers: torch.Tensor, cue: torch.Tensor, gate: torch.Tensor,
                   first_id: int) -> tuple[torch.Tensor, ...] | None:
    """Detectors for the facts of subjects with several facts (`fact_detectors`), appended at
    ids first_id + [0, D): their labels (cue: the fact's label, the id of its first detector in
    that layer; gate: its subject's cue label there), and the fact's answer rows re-gated on the
    fact's label (in place). Returns (keys, bias, cue, gate, groups, layers) or None."""
    fact_subjects = group_subjects(examples, False)
    found = fact_detectors(collect_queries(model, *prompt_positions(examples, tok, cfg.batch_size)),
                           fact_subjects, cfg.detector_prune)
    subject_label = {}                                                    # (layer, subject) -> cue label
    names = subject_names(examples, cfg.cue_per_phrasing)
    for r in torch.nonzero(cue >= 0).flatten().tolist():
        subject_label.setdefault((int(row_layers[r]), names[-1 - int(row_groups[r])]), int(cue[r]))
    fact_of_group = dict(enumerate(_fact_ids(examples, cfg.key_per_phrasing)))
    fact_of_group.update({FACT_GROUP + f: f for f in range(len(fact_subjects))})
    parts, fact_label, next_id = [], {}, first_id
    for layer, (keys, bias, fact, _) in found.items():
        gates = torch.tensor([subject_label.get((layer, fact_subjects[f]), -1) for f in fact.tolist()],
                             dtype=torch.int64)
        keep = gates >= 0                                                 # a subject without a cue: no detectors
        keys, bias, fact, gates = keys[keep], bias[keep], fact[keep], gates[keep]
        labels = torch.empty_like(fact)
        for i, f in enumerate(fact.tolist()):
            labels[i] = fact_label.setdefault((layer, f), next_id + i)
        parts.append((keys, bias, labels, gates, DETECTOR_GROUP + fact, torch.full_like(fact, layer)))
        next_id += fact.numel()
    if not fact_label:
        return None
    for r in torch.nonzero(gate >= 0).flatten().tolist():                # answer rows: open by their fact's evidence
        label = fact_label.get((int(row_layers[r]), fact_of_group.get(int(row_groups[r]), -1)))
        if label is not None:
            gate[r] = label
    return tuple(torch.cat(c) for c in zip(*parts))


def _label_names(subjects: Sequence[str], examples: Sequence, cue: torch.Tensor,
                 row_groups: torch.Tensor) -> dict[int, str]:
    """What each cue label stands for: "subject X" for a subject's cue, "X -> answer" for a
    fact's detectors (label -> name, for `interpret.explain`). subjects: `subject_names`."""
    facts: dict[tuple, str] = {}
    for e in examples:
        facts.setdefault(_group_key(e, False), f"{e.subject} -> {getattr(e, 'answer', '') or e.completion.strip()}")
    fact_names = list(facts.values())
    out = {}
    for r in torch.nonzero(cue >= 0).flatten().tolist():
        g = int(row_groups[r])
        out.setdefault(int(cue[r]), f"subject {subjects[-1 - g]}" if g < 0 else fact_names[g - DETECTOR_GROUP])
    return out


def _fact_ids(examples: Sequence, per_phrasing: bool) -> list[int]:
    """The fact (per-fact group id) of each of `_group_batches`' groups (list index = group id)."""
    facts: dict[tuple, int] = {}
    groups: dict[tuple, int] = {}
    for e in examples:
        groups.setdefault(_group_key(e, per_phrasing), facts.setdefault(_group_key(e, False), len(facts)))
    return list(groups.values())


# -- the training loop shared by every method ---------------------------------------------

def _grad_carrier(model: Transformer) -> list[nn.Parameter]:
    """Let gradients reach the readout (and so the rows) while the model is frozen:
    the codebooks require grad, their gradients are thrown away, they never move."""
    carriers = []
    for kl in model.knowledge_layers():
        for p in (kl.codebook_a, kl.codebook_b):
            p.requires_grad_(True)
            carriers.append(p)
    return carriers


def _run(model: Transformer, table: KnowledgeTable, loader: ExampleLoader, cfg: LearnConfig,
         params: list[nn.Parameter], lr: float, before_backward=None, extra_loss=None) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0) if params else None
    trainable = set(map(id, params))
    discard = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable]
    step0 = table.info().step
    losses = []
    model.train()
    for s in range(cfg.steps):
        batch = loader.batch(s)
        with parametrize.cached():
            _, loss = model(batch.inputs, batch.targets)
        if before_backward is not None:
            before_backward(s)
        total = loss if extra_loss is None else loss + extra_loss(s)
        total.backward()
        if opt is not None:
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p in discard:
            p.grad = None
        table.end_step(step0 + s)          # the store applies row gradients to unfrozen rows
        losses.append(float(loss.detach()))
    return losses


def _freeze_model(model: Transformer) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def learn(model: Transformer, table: KnowledgeTable, examples: Sequence, tok: ByteTokenizer,
          cfg: LearnConfig | None = None, *, background: Sequence[Batch] | None = None,
          publish: bool = True) -> LearnResult:
    """Teach `model` + `table` the facts in `examples` (corpus Examples or TextFacts)
    with cfg.method. For "new_rows" the model and every existing row stay bitwise
    unchanged. `background`: pretraining batches (sparse_memory's document
    frequencies; new_rows' key calibration). publish: snapshot the table as a new version."""
    cfg = cfg or LearnConfig()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    loader = _loader(examples, tok, cfg)
    n_old = table.info().num_rows
    old_ids = torch.arange(n_old, dtype=torch.int64)
    was_frozen = table.usage().frozen.clone()
    result = LearnResult(cfg.method, [])

    if cfg.method == "new_rows":
        _freeze_model(model)
        guard = _guard(model, background[:cfg.guard_batches], cfg.guard_weight) \
            if background and cfg.guard_weight > 0 else None
        plan = plan_new_rows(model, examples, tok, cfg, background, first_id=n_old)
        keys, bias, info = plan.keys, plan.bias, dict(plan.info)
        groups = {"cue": plan.cue, "gate": plan.gate} if plan.cue is not None else {}
        d_v = table.info().d_v
        values = torch.randn(keys.shape[0], d_v, generator=torch.Generator().manual_seed(cfg.seed)) * cfg.value_init_std
        detector = (plan.cue >= 0) & (plan.gate >= 0) if plan.cue is not None else torch.zeros(keys.shape[0], dtype=torch.bool)
        values[detector] = 0.0                              # never read
        result.new_ids = table.add_rows(values, keys, bias, **groups)
        detector_ids = result.new_ids[detector]
        table.set_frozen(old_ids, True)
        # Trained keys would carry the cue rows out of the place their calibration keeps
        # old text off, so with key_lr the cues stay as they were made (keys and values).
        cue_ids = result.new_ids[groups["cue"] >= 0] if groups and cfg.key_lr > 0 else None
        if cue_ids is not None and cue_ids.numel():
            table.set_frozen(cue_ids, True)
        model.refresh_table_state()
        result.info.update(info, new_rows=int(keys.shape[0]))
        with row_optimizer(table, cfg.row_optimizer or "adam", lr, cfg.key_lr, bias_step=0.0):
            _grad_carrier(model)
            try:
                result.losses = _run(model, table, loader, cfg, [], lr, extra_loss=guard)
            finally:
                _freeze_model(model)

    elif cfg.method == "sparse_memory":
        _freeze_model(model)
        df = _document_frequency(model, background or [], n_old)
        n_bg = max(1, sum(b.inputs.shape[0] for b in background or []))
        idf = torch.log((n_bg + 1) / (df + 1))
        table.set_frozen(old_ids, True)
        state = {"open": torch.zeros(0, dtype=torch.int64), "unfrozen": set()}

        def choose_rows(step: int) -> None:
            tf = torch.zeros(n_old, dtype=torch.float64)
            for kl in model.knowledge_layers():
                ids = kl.last_ids[kl.last_weights > 0]
                ids = ids[(ids >= 0) & (ids < n_old)]
                tf += torch.bincount(ids, minlength=n_old).double()
            score = tf * idf
            top = score.topk(min(cfg.top_t, int((tf > 0).sum()) or 1)).indices
            if state["open"].numel():
                table.set_frozen(state["open"], True)
            table.set_frozen(top, False)
            state["open"] = top
            state["unfrozen"].update(top.tolist())

        for kl in model.knowledge_layers():
            kl.record = True
        with row_optimizer(table, cfg.row_optimizer or "sgd", lr, bias_step=0.0):
            _grad_carrier(model)
            try:
                result.losses = _run(model, table, loader, cfg, [], lr, before_backward=choose_rows)
            finally:
                _freeze_model(model)
                for kl in model.knowledge_layers():
                    kl.record = False
        result.info["rows_updated"] = len(state["unfrozen"])

    elif cfg.method == "full_finetune":
        for p in model.parameters():
            p.requires_grad_(True)
        table.set_frozen(old_ids, False)
        mlr = cfg.model_lr if cfg.model_lr is not None else DEFAULT_LR["full_finetune"]
        row_lr = cfg.lr if cfg.lr is not None else None
        ctx = row_optimizer(table, cfg.row_optimizer or "adam", row_lr, bias_step=0.0) if row_lr \
            else contextlib.nullcontext()
        with ctx:
            result.losses = _run(model, table, loader, cfg, list(model.parameters()), mlr)
        _freeze_model(model)

    elif cfg.method == "lora":
        _freeze_model(model)
        params = add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        table.set_frozen(old_ids, True)
        mlr = cfg.model_lr if cfg.model_lr is not None else DEFAULT_LR["lora"]
        result.losses = _run(model, table, loader, cfg, params, mlr)
        merge_lora(model)
        _freeze_model(model)

    # restore the freeze flags the old rows had (new rows stay trainable)
    table.set_frozen(old_ids, False)
    if cfg.method == "new_rows" and result.new_ids is not None and result.new_ids.numel():
        table.set_frozen(result.new_ids, False)
        if detector_ids.numel():                            # never read: nothing should move them
            table.set_frozen(detector_ids, True)
    if bool(was_frozen.any()):
        table.set_frozen(old_ids[was_frozen[:n_old]], True)
    model.eval()
    if publish and getattr(table, "store_root", None):
        result.version = table.snapshot()
    result.seconds = time.perf_counter() - t0
    return result


def _guard(model: Transformer, batches: Sequence[Batch], weight: float):
    """A loss that keeps the model's predictions on old text where they were:
    weight * KL(base || now), base taken now (before any new row exists). Only new
    rows can move, so it pushes their keys out of old contexts."""
    from .generate import readout_mode
    with torch.no_grad(), readout_mode(model, "fetch"):
        was = model.training
        model.eval()
        base = [torch.log_softmax(model(b.inputs)[0], -1) for b in batches]
        model.train(was)

    def loss(step: int) -> torch.Tensor:
        i = step % len(batches)
        logp = torch.log_softmax(model(batches[i].inputs)[0], -1)
        return weight * (base[i].exp() * (base[i] - logp)).sum(-1).mean()
    return loss


@torch.no_grad()
def _document_frequency(model: Transformer, batches: Sequence[Batch], n_rows: int) -> torch.Tensor:
    """Number of documents (sequences of `batches`) in which each row was read (weight > 0).
    Lin et al. take a batch as the document over a 1M-row memory; with a table of
    ~1k rows every row is read in every batch, so the idf would be 0 for all: a
    sequence is the document here."""
    from .generate import recording_rows
    df = torch.zeros(n_rows, dtype=torch.float64)
    kls = model.knowledge_layers()
    with recording_rows(model):
        for b in batches:
            model(b.inputs)
            for i in range(b.inputs.shape[0]):       # a document = one sequence
                used = torch.zeros(n_rows, dtype=torch.bool)
                for kl in kls:
                    ids = kl.last_ids[i][kl.last_weights[i] > 0]
                    used[ids[(ids >= 0) & (ids < n_rows)]] = True
                df += used.double()
    return df


# -- measuring ------------------------------------------------------------------------------

@torch.no_grad()
def measure(model: Transformer, tok: ByteTokenizer, *, new_eval: Sequence, old_eval: Sequence,
            heldout_texts: Sequence[str], old_seen: Sequence = (), new_seen: Sequence = (),
            loss_batches: int = 8, seq_len: int = 64,
            batch_size: int = 16) -> dict:
    """New-fact recall, old-fact recall (held-out phrasings; `old_seen`: also on a
    trained phrasing; `new_seen`: new facts on a phrasing they were taught with) and held-out loss.
    Reads rows by fetch: measuring leaves the store's usage counts alone."""
    from . import evaluate
    from .data import packed_batches
    from .generate import generate_fn, readout_mode

    model.eval()
    with readout_mode(model, "fetch"):
        gen = generate_fn(model, tok)
        new = evaluate.recall_on_examples(gen, list(new_eval)) if new_eval else {"recall": float("nan")}
        old = evaluate.recall_on_examples(gen, list(old_eval)) if old_eval else {"recall": float("nan")}
        seen = evaluate.recall_on_examples(gen, list(old_seen)) if old_seen else {"recall": float("nan")}
        nseen = evaluate.recall_on_examples(gen, list(new_seen)) if new_seen else {"recall": float("nan")}
        batches = packed_batches(list(heldout_texts), tok, seq_len, batch_size)[:loss_batches]
        loss = evaluate.heldout_loss(lambda b: model(b.inputs, b.targets)[1], batches)["loss"]
    return {"new_recall": new["recall"], "old_recall": old["recall"], "heldout_loss": loss,
            "new_correct": new.get("correct"), "old_correct": old.get("correct"),
            "old_seen_recall": seen["recall"], "old_seen_correct": seen.get("correct"),
            "new_seen_recall": nseen["recall"], "new_seen_correct": nseen.get("correct")}


def forgetting(before: dict, after: dict) -> dict:
    """Relative drop of old-fact recall, and rise of held-out loss."""
    def drop(key):
        b = before.get(key, float("nan"))
        return (b - after[key]) / b if b > 0 else float("nan")
    return {"recall_drop": drop("old_recall"), "seen_recall_drop": drop("old_seen_recall"),
            "loss_rise": (after["heldout_loss"] - before["heldout_loss"]) / before["heldout_loss"]}


def new_row_interference(model: Transformer, batches: Sequence[Batch], first_new_id: int) -> float:
    """Share of (token, head) reads on `batches` that select at least one row with
    id >= first_new_id: how often new rows reach into old contexts."""
    from .generate import recording_rows
    kls = model.knowledge_layers()
    hit = total = 0
    with torch.no_grad(), recording_rows(model):
        for b in batches:
            model(b.inputs)
            for kl in kls:
                sel = (kl.last_ids >= first_new_id).any(-1)      # [B, S, h]
                hit += int(sel.sum())
                total += sel.numel()
    return hit / max(1, total)


@torch.no_grad()
def new_row_reads(model: Transformer, tok: ByteTokenizer, examples: Sequence, first_new_id: int) -> dict:
    """Do the new rows carry the answers? Teacher-forced on `examples`, at their answer
    positions: share of positions (and of the positions that predict the answer's first
    character, where the fact is decided) at which some head selects a new row, the
    readout weight new rows get there, and next-token accuracy with the new rows and
    with them ablated. Also the share of subject positions that read a new row."""
    from .data import collate_examples
    from .generate import readout_mode
    kls = model.knowledge_layers()
    table = kls[0].table
    b = collate_examples(list(examples), tok, True)
    scored = b.targets != -100
    first_char = scored & ((scored.cumsum(1) - 1) == 1)          # target 0 is the space before the answer
    _, _, at = subject_positions(list(examples), tok, 1 << 30, len(examples))
    subj = at[0][0]
    for kl in kls:
        kl.record = True
    try:
        with readout_mode(model, "fetch"):
            logits = model(b.inputs)[0]
        sel = torch.stack([(kl.last_ids >= first_new_id).any(-1) for kl in kls]).any(0)     # [B, S, h]
        wnew = torch.stack([(kl.last_weights * (kl.last_ids >= first_new_id)).sum(-1) for kl in kls]).mean(0)
        new_ids = torch.arange(first_new_id, table.info().num_rows)
        table.set_ablated(new_ids, True)
        model.refresh_table_state()
        try:
            with readout_mode(model, "fetch"):
                logits0 = model(b.inputs)[0]
        finally:
            table.set_ablated(new_ids, False)
            model.refresh_table_state()
    finally:
        for kl in kls:
            kl.record = False
    ok, ok0 = logits.argmax(-1) == b.targets, logits0.argmax(-1) == b.targets
    return {"answer_positions": int(scored.sum()),
            "answer_positions_reading_new": float(sel.any(-1)[scored].float().mean()),
            "first_char_positions_reading_new": float(sel.any(-1)[first_char].float().mean()),
            "new_weight_where_read": float(wnew[sel & scored[..., None]].mean()) if bool((sel & scored[..., None]).any()) else 0.0,
            "subject_positions_reading_new": float(sel.any(-1)[subj].float().mean()) if bool(subj.any()) else 0.0,
            "token_acc": float(ok[scored].float().mean()), "token_acc_new_rows_ablated": float(ok0[scored].float().mean()),
            "first_char_acc": float(ok[first_char].float().mean()),
            "first_char_acc_new_rows_ablated": float(ok0[first_char].float().mean())}


def _positions(examples: Sequence, tok: ByteTokenizer, kind: str, groups: list[list[int]]
               ) -> tuple[list[Batch], list[list[int]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """`collect_queries` arguments for one position per example, in batches of 64:
    "subject" (the subject's last token) or "first_char" (the query that predicts the
    answer's first character; target 0 is the space before it)."""
    examples = list(examples)
    if kind == "subject":
        batches, _, where = subject_positions(examples, tok, 1, 64)
        return batches, groups, where
    batches, _ = _group_batches(examples, tok, 64)
    where = []
    for b in batches:
        sc = b.targets != -100
        where.append((sc & ((sc.cumsum(1) - 1) == 1), torch.zeros_like(b.targets)))
    return batches, groups, where


@torch.no_grad()
def query_separation(model: Transformer, tok: ByteTokenizer, taught: Sequence, heldout: Sequence,
                     background: dict[int, torch.Tensor]) -> dict:
    """Can any key tell a new fact's held-out phrasing from old text? Per position kind
    ("first_char": the query that predicts the answer's first character; "subject":
    the query at the subject's last token), per fact and head: cos of the held-out
    phrasing's query with the fact's mean taught-phrasing direction, the largest cos
    of an old-text query (`background`) with it, and the share of held-out queries
    above that largest one (only those could select a row old text never selects)."""
    F = torch.nn.functional
    names: dict[tuple, int] = {}
    for e in taught:
        names.setdefault((e.subject, e.relation), len(names))
    heldout = [e for e in heldout if (e.subject, e.relation) in names]

    def at(examples, kind):
        groups = [[names[(e.subject, e.relation)] for e in examples[i:i + 64]] for i in range(0, len(examples), 64)]
        return collect_queries(model, *_positions(examples, tok, kind, groups))

    out = {}
    for kind in ("first_char", "subject"):
        qt, qh = at(list(taught), kind), at(heldout, kind)
        for layer, (q, gk) in qt.items():
            U, h = len(names), q.shape[1]
            u = F.normalize(torch.zeros(U, h, q.shape[2]).index_add_(0, gk[:, 0], F.normalize(q, dim=-1)), dim=-1)
            q2, g2 = qh[layer][0], qh[layer][1][:, 0]
            own = (F.normalize(q2, dim=-1) * u[g2]).sum(-1)                                   # [P, h]
            bg = F.normalize(background[layer], dim=-1)                                       # [Pb, h, d]
            old = torch.stack([(bg[:, j] @ u[:, j].T).max(0).values for j in range(h)], 1)   # [U, h]
            out[f"layer{layer}_{kind}"] = {"heldout_cos": float(own.mean()), "old_text_max_cos": float(old.mean()),
                                           "heldout_above_old_max": float((own > old[g2]).float().mean())}
    return out


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    s = torch.cat([pos, neg]).double()
    ranks = torch.empty_like(s)
    order = s.argsort()
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    for v in s.unique()[s.unique(return_counts=True)[1] > 1]:            # average the ranks of ties
        tie = s == v
        ranks[tie] = ranks[tie].mean()
    n, m = pos.numel(), neg.numel()
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def _probe(pos: torch.Tensor, neg: torch.Tensor, weight_decay: float = 1e-3) -> torch.Tensor:
    """A logistic-regression direction [d] (+ bias) separating pos [P, d] from neg [N, d]
    (classes weighted equally)."""
    X = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    w = torch.zeros(X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")
    pw = torch.tensor(len(neg) / max(len(pos), 1), dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w[:-1] + w[-1], y, pos_weight=pw) \
            + weight_decay * w[:-1].square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return w.detach()[:-1].float()


@torch.no_grad()
def novelty_probe(model: Transformer, tok: ByteTokenizer, taught: Sequence, new_heldout: Sequence,
                  old_heldout: Sequence, background: dict[int, torch.Tensor], max_background: int = 20000) -> dict:
    """Is "this is a new fact" a linear function of the knowledge layer's query? Per layer
    and position kind ("first_char": the query that predicts the answer's first character;
    "subject": the subject's last token), a logistic probe (every head's query concatenated)
    fitted on the new facts' taught phrasings against old text (`background`), then scored
    on held-out phrasings: AUC of new facts' against old facts' (0.5: no better than chance;
    what an ungated key or bias can tell at best), and against old text."""
    def at(examples, kind):
        groups = [[0] * len(examples[i:i + 64]) for i in range(0, len(examples), 64)]
        return {i: q.flatten(1) for i, (q, _) in collect_queries(model, *_positions(examples, tok, kind, groups)).items()}

    g = torch.Generator().manual_seed(0)
    out = {}
    for kind in ("first_char", "subject"):
        qt, qn, qo = at(taught, kind), at(new_heldout, kind), at(old_heldout, kind)
        for layer, bg in background.items():
            bg = bg.flatten(1)
            bg = bg[torch.randperm(bg.shape[0], generator=g)]
            fit, test = bg[:max_background // 2], bg[max_background // 2:max_background]
            w = _probe(qt[layer], fit)
            sn, so, sb = qn[layer] @ w, qo[layer] @ w, test @ w
            out[f"layer{layer}_{kind}"] = {"auc_new_vs_old_heldout": _auc(sn, so), "auc_new_heldout_vs_old_text": _auc(sn, sb),
                                           "new_heldout": int(sn.numel()), "old_heldout": int(so.numel())}
    return out


def _isfinite(x: float) -> bool:
    return x == x and not math.isinf(x)
