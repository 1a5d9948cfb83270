"""The generated wire contract: fresh, importable by its namespace name, no bare imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from byzps.proto import regenerate
from byzps.proto.v1 import parameter_server_pb2 as pb

GENERATED = sorted(
    p for p in regenerate.PACKAGE_DIR.iterdir() if p.suffix in (".py", ".pyi") and p.is_file()
)
ALLOWED_PREFIXES = ("byzps.proto.", "google.protobuf.")


def test_generated_code_is_fresh() -> None:
    """Regenerating into a temporary directory reproduces the committed files byte for byte."""
    assert regenerate.stale_files() == [], "run `python -m byzps.proto.regenerate`"


def test_stale_check_notices_an_edit(tmp_path: Path) -> None:
    for name, content in regenerate.committed().items():
        (tmp_path / name).write_bytes(content)
    edited = tmp_path / "parameter_server_pb2.py"
    edited.write_bytes(edited.read_bytes() + b"# hand edit\n")
    (tmp_path / "bench_pb2.pyi").unlink()
    (tmp_path / "orphan_pb2.py").write_bytes(b"")
    assert regenerate.stale_files(tmp_path) == [
        "bench_pb2.pyi",
        "orphan_pb2.py",
        "parameter_server_pb2.py",
    ]


def test_import_needs_no_path_tricks(tmp_path: Path) -> None:
    """A fresh interpreter outside the checkout finds the modules through the installed package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import byzps.proto.v1.parameter_server_pb2_grpc as g, byzps.proto.v1.bench_pb2 as b;"
        "print(g.__file__); print(g.ParameterServerStub.__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    path, stub = result.stdout.split()
    assert Path(path) == regenerate.PACKAGE_DIR / "parameter_server_pb2_grpc.py"
    assert stub == "ParameterServerStub"


def bare_imports(source: str) -> list[str]:
    """Imports of generated modules (`*_pb2`, `*_pb2_grpc`) not spelled by their full name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found += [
            n
            for n in names
            if n.rsplit(".", 1)[-1].endswith(("_pb2", "_pb2_grpc"))
            and not n.startswith(ALLOWED_PREFIXES)
        ]
    return found


@pytest.mark.parametrize(
    "source",
    ["import foo_pb2", "from . import foo_pb2", "from byzps.v1 import foo_pb2_grpc"],
)
def test_bare_import_detector_flags(source: str) -> None:
    assert bare_imports(source)


@pytest.mark.parametrize("path", GENERATED, ids=lambda p: p.name)
def test_generated_module_has_no_bare_import(path: Path) -> None:
    assert bare_imports(path.read_text()) == []


def test_generated_package_is_complete() -> None:
    names = {p.name for p in GENERATED}
    assert {"parameter_server_pb2.py", "parameter_server_pb2_grpc.py", "bench_pb2.py"} <= names


def test_service_shape() -> None:
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    assert service.full_name == "byzps.v1.ParameterServer"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Register", "GetModel", "GetModelUpdate", "PushUpdate", "Status"}
    assert methods["GetModel"].server_streaming and not methods["GetModel"].client_streaming
    assert methods["GetModel"].output_type.name == "ModelChunk"
    assert methods["GetModelUpdate"].server_streaming
    assert methods["GetModelUpdate"].output_type.name == "ModelUpdate"
    assert not methods["PushUpdate"].server_streaming
    assert methods["PushUpdate"].output_type.name == "Ack"


@pytest.mark.parametrize("enum", ["ValueDtype", "Compressor", "AckStatus"])
def test_enum_zero_is_unspecified(enum: str) -> None:
    """A field a sender forgot to set must not silently mean a real choice."""
    assert pb.DESCRIPTOR.enum_types_by_name[enum].values_by_number[0].name.endswith("UNSPECIFIED")


def test_seed_has_presence() -> None:
    """Seed 0 is a valid Rand-k seed, so "unset" must be distinguishable from 0."""
    update = pb.SparseUpdate(seed=0)
    assert update.HasField("seed")
    assert not pb.SparseUpdate().HasField("seed")
