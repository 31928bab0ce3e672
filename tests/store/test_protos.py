"""The committed protos/*_pb2*.py modules are exactly what `python -m protos.generate` makes."""
from __future__ import annotations

import re
from pathlib import Path

from protos import generate as gen

# Stamps of the installed protoc / grpcio-tools: a fresh machine may have newer
# tools than the ones that generated the committed files, which is not staleness.
_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
     r"\1 X, Y, Z,"),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = X"),
]


def _normalized(text: str) -> str:
    for pattern, repl in _STAMPS:
        text = pattern.sub(repl, text)
    return text


def test_generated_modules_are_fresh(tmp_path: Path):
    written = gen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(gen.generated_files())
    for path in written:
        committed = gen.PROTO_DIR / path.name
        assert committed.exists(), f"{committed} is missing: run python -m protos.generate"
        assert _normalized(committed.read_text()) == _normalized(path.read_text()), (
            f"{committed.name} is stale: run python -m protos.generate and commit the result")


def test_grpc_module_imports_package_relative():
    text = (gen.PROTO_DIR / "knowledge_store_pb2_grpc.py").read_text()
    assert "from . import knowledge_store_pb2" in text
    from protos import knowledge_store_pb2_grpc  # noqa: F401  (importable as a package module)
