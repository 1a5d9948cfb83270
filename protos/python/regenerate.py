"""Regenerate `byzps.proto.v1` from protos/byzps/v1/*.proto with grpcio-tools' bundled protoc.

Usage:  python -m byzps.proto.regenerate            # rewrite the committed modules
        python -m byzps.proto.regenerate --check    # exit 1 if they are stale

Why a virtual import root: protoc derives a generated module's imports from the .proto file's
name, so the files are compiled as `byzps/proto/v1/<name>.proto` (protoc's `-Ivirtual=disk`
mapping) while they live in protos/byzps/v1/. The modules then import each other as
`from byzps.proto.v1 import ...`, which resolves through the installed namespace without any
sys.path tricks. The protoc in grpcio-tools is pinned with the runtime, so the output is
byte-for-byte reproducible and can be compared against the committed copy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

#: Where the .proto sources live on disk ...
PROTO_DIR = Path(__file__).resolve().parent.parent / "byzps" / "v1"
#: ... the import root they are compiled under (mirrors the Python package name) ...
VIRTUAL_ROOT = "byzps/proto/v1"
#: ... and where the generated package is committed.
PACKAGE_DIR = Path(__file__).resolve().parent / "v1"

#: Each source and whether it defines a service (only those get a *_pb2_grpc module).
SOURCES: dict[str, bool] = {
    "parameter_server.proto": True,
    "shard_peer.proto": True,
    "bench.proto": False,
}

INIT_PY = b'"""Generated from protos/byzps/v1/ by byzps.proto.regenerate; do not edit."""\n'

#: Suffixes of every file this script owns inside PACKAGE_DIR.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate() -> dict[str, bytes]:
    """Compile every source; return {file name: content} for the generated package."""
    well_known = resources.files("grpc_tools") / "_proto"
    files: dict[str, bytes] = {"__init__.py": INIT_PY}
    with tempfile.TemporaryDirectory() as tmp:
        for source, has_service in SOURCES.items():
            args = [
                "protoc",
                f"-I{VIRTUAL_ROOT}={PROTO_DIR}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
            ]
            if has_service:
                args.append(f"--grpc_python_out={tmp}")
            if protoc.main([*args, f"{VIRTUAL_ROOT}/{source}"]) != 0:
                raise RuntimeError(f"protoc failed on {PROTO_DIR / source} (see stderr)")
        out = Path(tmp) / VIRTUAL_ROOT
        files.update({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    return files


def committed(package_dir: Path = PACKAGE_DIR) -> dict[str, bytes]:
    """The generated files currently in `package_dir`."""
    if not package_dir.is_dir():
        return {}
    return {
        p.name: p.read_bytes()
        for p in sorted(package_dir.iterdir())
        if p.name == "__init__.py" or p.name.endswith(GENERATED_SUFFIXES)
    }


def stale_files(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Names that differ between a fresh generation and `package_dir` (missing, extra, changed)."""
    fresh, old = generate(), committed(package_dir)
    return sorted(name for name in fresh.keys() | old.keys() if fresh.get(name) != old.get(name))


def write(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Regenerate into `package_dir`, removing generated files whose source is gone."""
    fresh = generate()
    package_dir.mkdir(parents=True, exist_ok=True)
    for name in committed(package_dir).keys() - fresh.keys():
        (package_dir / name).unlink()
    for name, content in fresh.items():
        (package_dir / name).write_bytes(content)
    return sorted(fresh)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {PACKAGE_DIR / name}", file=sys.stderr)
        return 1 if stale else 0
    for name in write():
        print(PACKAGE_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
