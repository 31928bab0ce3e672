"""Generate the Python modules of protos/knowledge_store.proto; the only way they are made.

    python -m protos.generate            # writes into protos/
    python -m protos.generate --out DIR  # writes elsewhere (tests/store/test_protos.py checks staleness)

grpc_tools.protoc writes `import knowledge_store_pb2` into the _pb2_grpc module,
which only works with protos/ on sys.path; we rewrite it to a package-relative
import here, never by hand.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("knowledge_store.proto",)


def _generated_names(proto: str) -> list[str]:
    stem = Path(proto).stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generated_files() -> list[str]:
    return [name for proto in PROTOS for name in _generated_names(proto)]


def generate(out_dir: str | Path = PROTO_DIR) -> list[Path]:
    """Run protoc on every .proto in PROTOS; return the files written."""
    from grpc_tools import protoc
    import grpc_tools

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    written = []
    for proto in PROTOS:
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_DIR / proto),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
        stem = Path(proto).stem
        grpc_module = out_dir / f"{stem}_pb2_grpc.py"
        text = grpc_module.read_text()
        text = re.sub(rf"^import {stem}_pb2 as ", f"from . import {stem}_pb2 as ", text, flags=re.M)
        grpc_module.write_text(text)
        written += [out_dir / name for name in _generated_names(proto)]
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(PROTO_DIR), help="output directory (default: protos/)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
