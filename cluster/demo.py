"""The main job (`kstore demo`): the point of the system, end to end, on an embedded
Ray cluster on this machine, in a few minutes on 2 CPU cores.

1. start 2 store shard actors (gRPC, Zarr-backed) and 1 worker actor;
2. train a small MoE + knowledge model on the demo facts corpus (12 countries and
   12 cities; the row gradients go to the shards);
3. ask the four QUESTIONS below (phrasings it was trained on) and one phrasing it
   never saw (HELD_OUT);
4. find the rows behind the first right answer (the readout weight on the positions
   that predict it, model_worker.interpret) that no other right answer leans on;
5. publish a snapshot, ablate those rows while serving: that answer goes, the
   others stay;
6. hot-swap the store back to the snapshot: the answer is back;
7. `learn` NEW_FACTS (capitals of countries the corpus does not have) as new rows,
   while the cluster serves, and ask them on a phrasing they were not taught;
8. print a summary table, write summary.json, stop the cluster.

The questions and facts are fixed here, before any run; the training budget is
what makes the model know them (DemoConfig).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import ray

from model_worker.provenance import provenance

from .config import ClusterConfig
from .launch import StoreCluster
from .worker_actor import WorkerActor, follow_training

log = logging.getLogger(__name__)

# Trained phrasings (templates 0-3 of model_worker/data/templates.py) of facts in the
# demo corpus, and the greedy answer's expected start.
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("The capital of Japan is", "Tokyo"),
    ("The currency of Nigeria is", "Naira"),
    ("The main language of Brazil is", "Portuguese"),
    ("The time zone of Istanbul is", "Europe/Istanbul"),
)
# A phrasing no training text uses (template 4, held out of the corpus for every fact).
HELD_OUT: tuple[str, str] = ("Which city is the capital of Japan? It is", "Tokyo")
# New facts for `learn`: capitals of countries the demo corpus does not hold (a test checks).
NEW_FACTS: tuple[tuple[str, str], ...] = (("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"),
                                          ("Egypt", "Cairo"))
TAUGHT_TEMPLATES = (0, 1, 2)   # capital_of phrasings `learn` is given
ASKED_TEMPLATE = 3             # "The seat of government of {s} is in": never given for a new fact


@dataclass
class DemoConfig:
    steps: int = 1000
    model: str = "small-knowledge"
    # the knowledge layer replaces block 2's FFN and the other FFNs are narrow, so that
    # facts live in the rows (where they can be found, ablated and swapped back)
    model_overrides: dict = field(default_factory=lambda: {
        "d_ff": 48, "n_experts": 4,
        "knowledge": {"layers": [2], "placement": "replace", "n_heads": 2, "d_k": 32, "k": 16, "n_sub": 64,
                      "value_lr": 0.05}})
    corpus: str = "demo"
    seq_len: int = 64
    lr: float = 3e-3
    num_shards: int = 2
    rows_per_answer: int = 64      # the rows behind an answer: its top rows by readout weight
    ablation_rounds: int = 6       # ... looked for again after each ablation, up to this many times
    learn_steps: int = 60
    background_batches: int = 32   # old-text batches that calibrate the new rows' keys


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _right(got: str, expected: str) -> bool:
    return got.strip().startswith(expected)


def _prompt(template_id: int, subject: str) -> str:
    from model_worker.data.templates import TEMPLATES, split_template
    prefix, _ = split_template(TEMPLATES["capital_of"][template_id])
    return prefix.format(s=subject)


def new_fact_lines() -> list[str]:
    """`learn`'s input: 'prompt<TAB>answer<TAB>subject', the taught phrasings of NEW_FACTS."""
    return [f"{_prompt(t, s)}\t{a}\t{s}" for s, a in NEW_FACTS for t in TAUGHT_TEMPLATES]


def ablation_rows(behind: list[list[int]], target: int, others: list[int]) -> list[int]:
    """The target answer's rows that none of the other answers' rows include."""
    taken = {r for i in others for r in behind[i]}
    return [r for r in behind[target] if r not in taken]


def _ablate_until_changed(worker, table, cfg: DemoConfig, target: int, others: list[int]):
    """Ablate the target answer's rows in rounds: a fact is spread over many rows, and
    once its best rows are gone the search reads the next ones, which learnt it too;
    each round takes the rows it reads now. Stops when the answer changes (or after
    cfg.ablation_rounds). Returns (every row ablated, the answers to QUESTIONS after)."""
    import torch
    rows: list[int] = []
    answers: list[str] = []
    for r in range(cfg.ablation_rounds):
        behind = ray.get(worker.rows_behind.remote(list(QUESTIONS), cfg.rows_per_answer))
        new = [x for x in ablation_rows(behind, target, others) if x not in set(rows)]
        if not new:
            break
        table.set_ablated(torch.tensor(new, dtype=torch.int64), True)
        rows += new
        answers = ray.get(worker.answer.remote([x for x, _ in QUESTIONS]))
        print(f"   round {r + 1}: {len(new)} rows ablated ({new[:8]}{' ...' if len(new) > 8 else ''}) -> "
              f"{answers[target].strip()!r}", flush=True)
        if not _right(answers[target], QUESTIONS[target][1]):
            break
    return rows, answers


def run_demo(steps: int | None = None, store_root: str = "runs/demo", num_shards: int = 2,
             config: DemoConfig | None = None) -> dict:
    from model_worker.train import TrainConfig, model_config, table_config

    cfg = config or DemoConfig()
    cfg = dataclasses.replace(cfg, steps=steps or cfg.steps, num_shards=num_shards)
    t_start, load_start = time.time(), os.getloadavg()[0]
    root = os.path.abspath(store_root)
    shutil.rmtree(root, ignore_errors=True)
    train_cfg = TrainConfig(model=cfg.model, model_overrides=cfg.model_overrides, corpus=cfg.corpus,
                            steps=cfg.steps, seq_len=cfg.seq_len, lr=cfg.lr, threads=1,
                            out_dir=os.path.join(root, "checkpoints"), ckpt_every=cfg.steps, eval_every=0,
                            num_shards=cfg.num_shards)
    tcfg = table_config(model_config(train_cfg, 260), train_cfg)
    ccfg = ClusterConfig(store_root=os.path.join(root, "store"), num_shards=cfg.num_shards)

    _say(f"starting an embedded Ray cluster: {cfg.num_shards} store shards, 1 worker")
    cluster = StoreCluster.start(ccfg, tcfg)
    s: dict = {"asked": len(QUESTIONS)}
    try:
        for sh in cluster.status()["shards"]:
            print(f"   shard {sh['shard']}: rows {sh['rows'][0]}..{sh['rows'][1]} at {sh['address']}, "
                  f"version {sh['version']}")
        worker = WorkerActor.options(**ccfg.worker.ray_options()).remote(ccfg.admin_token)

        _say(f"training {cfg.model} on the '{cfg.corpus}' facts corpus for {cfg.steps} steps "
             "(row gradients go to the shards, applied at each step barrier)")
        result = follow_training(worker, worker.train.remote(dataclasses.asdict(train_cfg), ccfg.to_dict()))
        print(f"   final loss {result['final_loss']:.3f}, {result['tokens_per_s']:.0f} tokens/s")

        _say("asking questions it was trained on, and one phrasing it never saw (greedy answers)")
        prompts = [q for q, _ in QUESTIONS] + [HELD_OUT[0]]
        got = ray.get(worker.answer.remote(prompts))
        right = [_right(g, a) for g, (_, a) in zip(got, list(QUESTIONS) + [HELD_OUT])]
        for (q, a), g, ok in zip(list(QUESTIONS) + [HELD_OUT], got, right):
            print(f"   {'right' if ok else 'WRONG'}  {q!r} -> {g.strip()!r}   (expected {a!r})")
        known = [i for i in range(len(QUESTIONS)) if right[i]]
        s.update(known_answers=len(known), heldout_answered=right[-1], answers=got)

        s.update(ablation_changed_answer=False, others_unchanged_by_ablation=False, swap_restored_answer=False)
        if known:
            target, others = known[0], known[1:]
            q, a = QUESTIONS[target]
            table = cluster.table()
            try:
                snapshot = table.snapshot()
                _say(f"the rows behind {q!r} -> {a!r}, ablated while serving (snapshot version {snapshot} "
                     f"published first): each round, its top {cfg.rows_per_answer} rows by readout weight that "
                     "no other right answer uses")
                rows, ablated = _ablate_until_changed(worker, table, cfg, target, others)
            finally:
                table.close()
            for i, g in enumerate(ablated):
                print(f"   {QUESTIONS[i][0]!r} -> {g.strip()!r}" + ("   <- its rows ablated" if i == target else ""))
            s["ablation_changed_answer"] = not _right(ablated[target], a)
            s["others_unchanged_by_ablation"] = all(_right(ablated[i], QUESTIONS[i][1]) for i in others)

            _say(f"hot-swapping the store back to snapshot version {snapshot}")
            t0 = time.time()
            cluster.swap(snapshot)
            restored = ray.get(worker.answer.remote([q]))[0]
            print(f"   swapped in {time.time() - t0:.2f}s; {q!r} -> {restored.strip()!r}")
            s["swap_restored_answer"] = _right(restored, a)
            s.update(target=q, rows_ablated=len(rows), ablated_answer=ablated[target], restored_answer=restored)

        lines = new_fact_lines()
        _say(f"learning {len(NEW_FACTS)} new facts as new rows, while the cluster serves "
             f"({len(TAUGHT_TEMPLATES)} phrasings each; the model's weights and old rows stay as they are)")
        for line in lines[::len(TAUGHT_TEMPLATES)]:
            print(f"   {line.split(chr(9))[0]} {line.split(chr(9))[1]}.")
        learned = ray.get(worker.learn.remote(lines, cfg.corpus, {"steps": cfg.learn_steps},
                                              cfg.background_batches))
        print(f"   {learned['new_rows']} new rows, loss {learned['loss_first']:.2f} -> {learned['loss_last']:.2f} "
              f"in {learned['seconds']:.0f}s, published as version {learned['version']}")
        asks = [_prompt(ASKED_TEMPLATE, sub) for sub, _ in NEW_FACTS]
        answers = ray.get(worker.answer.remote(asks + [x for x, _ in QUESTIONS]))
        _say("asking the new facts on a phrasing they were not taught")
        ok_new = [_right(g, a) for g, (_, a) in zip(answers, NEW_FACTS)]
        for q, g, ok, (_, a) in zip(asks, answers, ok_new, NEW_FACTS):
            print(f"   {'right' if ok else 'WRONG'}  {q!r} -> {g.strip()!r}   (expected {a!r})")
        still = sum(_right(g, a) for g, (_, a) in zip(answers[len(asks):], QUESTIONS))
        print(f"   the trained questions after learning: {still} of {len(QUESTIONS)} right")
        s.update(learned_facts=len(NEW_FACTS), learned_facts_answered=sum(ok_new), new_rows=learned["new_rows"],
                 known_answers_after_learn=still)
    finally:
        _say("stopping the cluster")
        cluster.stop()
    s["seconds"] = round(time.time() - t_start, 1)
    # what else ran: on a shared machine the wall time says as much about the load as the demo
    s["machine"] = {"cpus": os.cpu_count(), "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0],
                    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_start))}
    s["provenance"] = provenance()   # commit, command, machine, date: where this summary came from
    s["headline"] = {k: s.get(k) for k in ("known_answers", "asked", "ablation_changed_answer",
                                           "others_unchanged_by_ablation", "swap_restored_answer",
                                           "learned_facts_answered", "learned_facts", "seconds")}
    _summary_table(s)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    print(f"   store versions, checkpoints and summary.json are under {root}")
    return s


def _summary_table(s: dict) -> None:
    def yn(v) -> str:
        return "yes" if v else "NO"
    rows = [
        ("trained questions answered right", f"{s.get('known_answers', 0)} of {s['asked']}"),
        ("a phrasing never seen answered right", yn(s.get("heldout_answered"))),
        ("ablating one answer's rows changed it", yn(s.get("ablation_changed_answer"))),
        ("  ... and left the other answers right", yn(s.get("others_unchanged_by_ablation"))),
        ("hot swap to the snapshot restored it", yn(s.get("swap_restored_answer"))),
        ("new facts learned as new rows", f"{s.get('learned_facts_answered', 0)} of {s.get('learned_facts', 0)} "
                                          "answered on an untaught phrasing"),
        ("wall time", f"{s['seconds']:.0f} s"),
    ]
    _say("summary")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"   {k:<{width}}  {v}")
