"""Every benchmark script imports: a script whose import breaks (a helper moved, a name
stopped being re-exported) fails here, not in the hands of whoever runs it next. One
subprocess, so that no import's side effects (env vars, Triton's interpreter) reach the
other tests."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_module_imports():
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, traceback\nbad = []\n"
            f"for n in {names!r}:\n"
            "    try:\n        importlib.import_module('benchmarks.' + n)\n"
            "    except Exception:\n        bad.append((n, traceback.format_exc(limit=3)))\n"
            "print('\\n'.join(f'{n}: {t}' for n, t in bad))\nraise SystemExit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
