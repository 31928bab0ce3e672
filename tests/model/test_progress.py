"""Progress bars: live (tqdm) in a terminal, about one line per 10% in a file or a pipe."""
from __future__ import annotations

import io

from tqdm import tqdm

from model_worker.progress import LineProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_tqdm():
    bar = progress_bar(range(3), total=3, file=_Terminal())
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]


def test_a_file_gets_a_line_per_tenth():
    out = io.StringIO()
    seen = []
    bar = progress_bar(range(1000), total=1000, desc="train", file=out)
    assert isinstance(bar, LineProgress)
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    lines = out.getvalue().splitlines()
    assert seen == list(range(1000))
    assert len(lines) == 10                                   # 10%, 20%, ..., 100%
    assert lines[0].startswith("train: 100/1000 (10%)") and "loss=" in lines[0]
    assert lines[-1].startswith("train: 1000/1000 (100%)")
    assert "\r" not in out.getvalue()


def test_driven_from_outside_with_a_time_floor(monkeypatch):
    out = io.StringIO()
    clock = iter(range(0, 10_000, 100))                       # each call: 100 s later
    monkeypatch.setattr("model_worker.progress.time.monotonic", lambda: next(clock))
    bar = progress_bar(total=10_000, initial=50, desc="d", file=out, every_s=60.0)
    bar.n = 51
    bar.refresh()                                             # < 10% moved, but a minute passed
    bar.refresh()                                             # nothing moved: no line
    bar.close()
    bar.close()
    assert out.getvalue().splitlines() == ["d: 51/10000 (1%) 100s"]


def test_disabled_writes_nothing():
    out = io.StringIO()
    assert list(progress_bar(range(5), disable=True, file=out)) == list(range(5))
    assert out.getvalue() == ""
