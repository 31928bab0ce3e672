"""Where a run came from: the git commit and whether the tree was dirty, the full command
line, the machine, the date, the device, python and torch. Every results JSON carries it
(benchmarks/common.py re-exports it), and so does the demo's summary (cluster/demo.py)."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from typing import Sequence


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# The fields every results JSON's "provenance" holds (tests/benchmarks/test_provenance.py checks them).
PROVENANCE_FIELDS = ("commit", "dirty", "command", "machine", "date", "device", "python", "torch")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """The checked-out commit ("unknown" outside a git checkout)."""
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool:
    """Uncommitted changes to tracked files (the code that ran may not be the commit's).
    Results files are left out: a script rewriting its own JSON does not make the code dirty."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return any(line and not line[3:].startswith("benchmarks/results/") for line in out.splitlines())


def machine() -> dict:
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "hostname": platform.node()}


def provenance(argv: Sequence[str] | None = None, device: str = "cpu") -> dict:
    """Where a result came from, written by the script that measured it: git commit and
    whether the tree had uncommitted changes, the full command line (`argv`; default
    sys.argv[1:]), the machine, the UTC date, the device the work ran on ("cpu", "cuda: <name>"),
    python and torch versions."""
    try:
        import torch
        torch_version = torch.__version__
        if device.startswith("cuda") and torch.cuda.is_available() and ":" not in device:
            device = f"cuda: {torch.cuda.get_device_name()}"
    except ImportError:
        torch_version = None
    out = {"commit": git_commit(), "dirty": git_dirty(), "command": command_line(argv),
           "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device, "python": platform.python_version(), "torch": torch_version}
    source = os.environ.get(SOURCE_COMMIT_ENV)
    if source:
        # The tree was copied to this machine with a `.git` that is not its own (the GPU
        # machine gets the session's checkout): the sender names the commit the tree is, and
        # what git says here is kept beside it.
        # The sender vouches that the tree is that commit, clean (it names the full hash).
        if len(source) != 40:
            raise ValueError(f"{SOURCE_COMMIT_ENV} must hold a full 40-character commit hash, got {source!r}")
        out.update(commit=source, commit_from=SOURCE_COMMIT_ENV, git_here={"commit": out["commit"], "dirty": out["dirty"]},
                   dirty=False)
    return out


SOURCE_COMMIT_ENV = "KSTORE_SOURCE_COMMIT"


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran, as one could type it again: `python -m <module>` (or the script)
    followed by `argv`, the arguments (default sys.argv[1:]), shell-quoted."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("pytest", "pytest.__main__"):
        head = ["python", "-m", spec.name.removesuffix(".__main__")]
    else:
        head = ["python", os.path.relpath(sys.argv[0], REPO) if sys.argv and sys.argv[0] else "<interactive>"]
    return shlex.join([*head, *(sys.argv[1:] if argv is None else argv)])
