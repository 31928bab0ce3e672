"""Every results JSON says where it came from, in fields its script wrote (issue 24)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import check_reuse, git_commit, provenance, write_result

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# what issue 24 asks every result to carry (python and torch versions come along from `provenance`)
REQUIRED = ("commit", "dirty", "command", "machine", "date", "device")


def _results() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*.json") if "archive" not in p.relative_to(RESULTS).parts)


@pytest.mark.parametrize("path", _results(), ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_results_json_carries_provenance(path):
    data = json.loads(path.read_text())
    prov = data.get("provenance")
    assert isinstance(prov, dict), f"{path.name}: no provenance (re-run it, or move it to results/archive/ with a note)"
    missing = [k for k in REQUIRED if prov.get(k) in (None, "")]
    assert not missing, f"{path.name}: provenance lacks {missing}"
    assert len(prov["commit"]) == 40 and isinstance(prov["dirty"], bool)
    assert "headline" in data, f"{path.name}: no headline"


def test_the_archive_says_why_its_files_are_there():
    if (RESULTS / "archive").is_dir():
        assert (RESULTS / "archive" / "NOTE.md").is_file()


def test_provenance_names_this_commit_the_command_and_the_machine():
    p = provenance(["--steps", "3", "--configs", '{"a": 1}'], device="cpu")
    assert p["commit"] == git_commit() and len(p["commit"]) == 40
    assert p["command"].endswith("--steps 3 --configs '{\"a\": 1}'")
    assert p["machine"]["cores"] >= 1 and p["machine"]["cpu_model"]
    assert p["date"].endswith("+00:00") and p["python"] == ".".join(map(str, sys.version_info[:3]))


def test_write_result_adds_provenance_and_needs_a_headline(tmp_path):
    out = write_result(str(tmp_path / "r.json"), {"headline": {"x": 1}}, argv=["--x"])
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == out and on_disk["provenance"]["command"].endswith("--x")
    with pytest.raises(ValueError, match="headline"):
        write_result(str(tmp_path / "s.json"), {"x": 1})


def test_a_reuse_from_another_commit_is_refused_unless_forced():
    same = check_reuse({"provenance": {"commit": git_commit(), "dirty": False}})
    assert same["same_commit"] and not same["forced"]
    other = {"provenance": {"commit": "f" * 40, "dirty": False}}
    with pytest.raises(SystemExit, match="refusing to reuse"):
        check_reuse(other)
    with pytest.raises(SystemExit):
        check_reuse({})                       # no provenance: where it came from is unknown
    forced = check_reuse(other, force=True)
    assert forced["forced"] and forced["from_commit"] == "f" * 40


def test_dirty_flag_sees_uncommitted_code_only_when_there_is_some():
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=RESULTS.parents[1],
                            capture_output=True, text=True).stdout
    code = [line for line in status.splitlines() if not line[3:].startswith("benchmarks/results/")]
    assert provenance()["dirty"] == bool(code)
