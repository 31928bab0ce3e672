"""README.md's commands work as written: every block marked `<!-- ci: run -->` is taken
from README.md itself and run, in README order, in one fresh directory (sh blocks by
bash, python blocks by this interpreter), with their defaults. The cluster block
starts a real Ray head and shard actors (`kstore up`) and stops them (`kstore down`)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- ci: run -->"


def marked_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block right after a MARK line."""
    blocks = []
    for m in re.finditer(r"^" + re.escape(MARK) + r"[ \t]*\n```(\w+)\n(.*?)\n```", text, re.S | re.M):
        blocks.append((m.group(1), m.group(2)))
    return blocks


def test_the_marks_find_the_blocks():
    text = (ROOT / "README.md").read_text()
    blocks = marked_blocks(text)
    marks = [line for line in text.splitlines() if line.strip() == MARK]
    assert len(marks) == len(blocks), "a mark is not followed by a fenced block"
    langs = [lang for lang, _ in blocks]
    assert set(langs) <= {"sh", "python"} and "python" in langs
    joined = "\n".join(code for _, code in blocks)
    for needed in ("kstore up", "kstore status", "kstore admin stats", "kstore admin snapshot",
                   "kstore admin swap", "kstore scale", "kstore down", "python -m model_worker.train",
                   "python -m model_worker.generate"):
        assert needed in joined, f"README's CI blocks lack {needed!r}"


def _env() -> dict:
    env = dict(os.environ)
    # `kstore` and `python` as a fresh shell would find them after `. .venv/bin/activate`;
    # this checkout's packages first (an editable install elsewhere must not shadow them)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("KSTORE_STATE", None)
    return env


def _run(lang: str, code: str, cwd: Path, i: int) -> subprocess.CompletedProcess:
    if lang == "sh":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        script = cwd / f"readme_block_{i}.py"
        script.write_text(code + "\n")
        cmd = [sys.executable, str(script)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(1800)   # ~2 min on 2 idle cores; a loaded machine takes many times that
def test_readme_commands_run_as_written(tmp_path):
    blocks = marked_blocks((ROOT / "README.md").read_text())
    head_pid = None
    try:
        for i, (lang, code) in enumerate(blocks):
            out = _run(lang, code, tmp_path, i)
            m = re.search(r"started a Ray head at \S+ \(pid (\d+)\)", out.stdout)
            head_pid = int(m.group(1)) if m else head_pid
            assert out.returncode == 0, f"README block {i} ({lang}) failed:\n{code}\n--- stdout\n" \
                                        f"{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"
    finally:
        if (tmp_path / ".kstore" / "cluster.json").exists():   # a block failed with the cluster up
            subprocess.run(["kstore", "down"], cwd=tmp_path, env=_env(), capture_output=True, timeout=120)
    assert head_pid is not None, "no block started a Ray head"
    assert not _alive(head_pid), "kstore down left the Ray head running"
    assert not (tmp_path / ".kstore" / "cluster.json").exists()


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False
