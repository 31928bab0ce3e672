"""The layout rules of issue 17, kept by CI: no import circles and no oversized source file
(scripts/check_layout.py), no model concept named in the store, tests that never import
each other."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_circles_and_no_file_over_its_limit():
    r = subprocess.run([sys.executable, "scripts/check_layout.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 circles, 0 files over their limit" in r.stdout


def test_the_store_names_no_model_concept():
    pattern = re.compile(r"cue|(^|[^a-z])gate|detect", re.IGNORECASE)
    files = list((ROOT / "store_service").rglob("*.py")) + list((ROOT / "protos").glob("*.proto"))
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_no_test_module_imports_another():
    pattern = re.compile(r"^\s*(from|import)\s+tests(\.|\s|$)", re.MULTILINE)
    offenders = [str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("*.py") if pattern.search(f.read_text())]
    assert not offenders, offenders
