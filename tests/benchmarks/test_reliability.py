"""benchmarks/reliability.py's own cases (issue 18's exact calls) against a served shard:
each is refused cleanly with the admin token and UNAUTHENTICATED without one, and leaves
the rows finite (the whole script runs for minutes: `python -m benchmarks.reliability
--fuzz-seconds 2 --swaps 4 --restarts 2 --out /tmp/r.json` is its smoke run)."""
from __future__ import annotations

import torch

from benchmarks import reliability
from store_service.hostile import HostileClient, judge


def test_issue_calls_are_refused_cleanly(hostile):
    h = hostile
    assert (h.D_K, h.D_V) == (reliability.D_K, reliability.D_V)
    client = HostileClient(h.server.address, h.tokens.admin, timeout_s=5.0)
    cases = reliability._issue_calls()
    assert len({c.attack for c in cases}) == len(cases) >= 14
    for case in cases:
        with_token = client.send(case, credentials=True)
        assert with_token in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"), (case.attack, with_token)
        assert judge(case, False, client.send(case, credentials=False)) == []
    assert bool(torch.isfinite(h.shard.state_dict()["values"]).all())
    client.channel.close()
