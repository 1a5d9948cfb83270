"""Deployment manifests for a run: a Compose project and Kubernetes Jobs, derived from its config.

Why generated: the ids are the run's arithmetic — n workers, the first h = n − f honest (ids
0 … h−1), one cohort process holding ids h … n−1 (none under "na") — and hand-edited manifests
drift from the config they deploy. `byzps deploy` writes them from the config, and the copies
in deploy/ are this module's output for the README's main job (tests/test_deploy.py checks both
that they are current and that they pass the real validators).

Credentials follow the ids: the master secret is mounted in the server alone; each honest
worker K gets only its own token (`byzps credentials issue`: worker-K.token) and the cohort only
its ids' tokens, so no process can authenticate as an id it does not hold. That is why every
honest worker is a service (Compose) or a Job (Kubernetes) of its own: an Indexed Job's pods
share one pod template, hence one set of Secret volumes, and each would mount every worker's
token.

Pure functions from a RunConfig to plain dicts; the CLI writes them as YAML.
"""

from __future__ import annotations

from typing import Any

from byzps.common.config import RunConfig
from byzps.common.credentials import token_file_name

PORT = 50051
#: The Compose secret of the master secret (the server's file ./secret).
SECRET = "byzps_secret"
#: Where the run config sits inside every container.
CONFIG_PATH = "/etc/byzps/run/run.toml"
#: Workers wait this long for a server that is still starting (image pulls, scheduling).
RETRY_TIMEOUT = "600"
#: The cohort's role name (its Compose service; its Job is byzps-attack).
COHORT = "attack"


def holders(config: RunConfig) -> dict[str, list[int]]:
    """Every client process of the run by role name, with the worker ids it holds, which are
    also the only ids whose tokens it is given: worker-K holds K (K < h), the cohort "attack"
    holds h … n−1 (absent under "na")."""
    h, n = config.honest_workers, config.cluster.workers
    roles = {f"worker-{k}": [k] for k in range(h)}
    if n > h:
        roles[COHORT] = list(range(h, n))
    return roles


def server_argv(secret_path: str) -> list[str]:
    """The server's `byzps` argv: the run config, the master secret, results under /data/run."""
    return [
        "server",
        "--config",
        CONFIG_PATH,
        "--listen",
        f"0.0.0.0:{PORT}",
        "--out",
        "/data/run",
        "--resume",
        "--secret-file",
        secret_path,
        "--linger",
        "60",
    ]


def client_argv(role: str, ids: list[int], server: str, credentials_dir: str) -> list[str]:
    """The `byzps` argv of a client process holding `ids`, whose tokens are mounted as
    CREDENTIALS_DIR/worker-ID.token: a worker reads its one file, the cohort the directory."""
    common = ["--server", server, "--threads", "1", "--retry-timeout", RETRY_TIMEOUT]
    if role == COHORT:
        return ["attack", *common, "--token-dir", credentials_dir,
                "--count", str(len(ids)), "--first-id", str(ids[0])]  # fmt: skip
    (k,) = ids
    return ["worker", *common, "--id", str(k),
            "--token-file", f"{credentials_dir}/{token_file_name(k)}"]  # fmt: skip


# --------------------------------------------------------------------------- Compose

#: Compose mounts a service's secrets here, and only its own.
COMPOSE_SECRETS = "/run/secrets"


def token_secret(worker_id: int) -> str:
    """The Compose secret holding worker `worker_id`'s token (./credentials/worker-ID.token)."""
    return f"worker-{worker_id}-token"


def compose_project(config: RunConfig, image: str) -> dict[str, Any]:
    """A Compose project: the server (health-checked, results in a volume), one service per
    honest worker id and the cohort; the run config, the master secret and the tokens come from
    files beside it (run.toml, secret, credentials/worker-ID.token), each token mounted in the
    one service that holds its id."""
    after_server = {"depends_on": {"server": {"condition": "service_healthy"}}}
    services: dict[str, Any] = {
        "server": {
            "image": image,
            "secrets": [SECRET],
            "configs": [{"source": "run", "target": CONFIG_PATH}],
            "command": server_argv(f"{COMPOSE_SECRETS}/{SECRET}"),
            "volumes": ["server-data:/data"],
            "healthcheck": {
                "test": [
                    "CMD",
                    "byzps",
                    "status",
                    "--server",
                    f"127.0.0.1:{PORT}",
                    "--timeout",
                    "3",
                ],
                "interval": "5s",
                "timeout": "10s",
                "retries": 30,
                "start_period": "60s",
            },
        }
    }
    for role, ids in holders(config).items():
        services[role] = {
            "image": image,
            "secrets": [{"source": token_secret(i), "target": token_file_name(i)} for i in ids],
            "command": client_argv(role, ids, f"server:{PORT}", COMPOSE_SECRETS),
            **after_server,
        }
    secrets = {SECRET: {"file": "./secret"}}
    for i in range(config.cluster.workers):
        secrets[token_secret(i)] = {"file": f"./credentials/{token_file_name(i)}"}
    return {
        "name": "byzps",
        "services": services,
        "configs": {"run": {"file": "./run.toml"}},
        "secrets": secrets,
        "volumes": {"server-data": {}},
    }


# --------------------------------------------------------------------------- Kubernetes


def _job(
    name: str,
    component: str,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    run_as: dict[str, Any],
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            **spec,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/component": component}},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, **run_as},
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def _container(
    name: str, args: list[str], mounts: list[dict[str, Any]], cpu: str, memory: str, limit: str
) -> dict[str, Any]:
    return {
        "name": name,
        "image": "byzps",
        "args": args,
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": limit}},
        "volumeMounts": mounts,
    }


#: The Secret of the master secret (key "secret"), mounted in the server's pod only.
SECRET_VOLUME = {"name": "secret", "secret": {"secretName": "byzps-secret"}}
SECRET_MOUNT = {"name": "secret", "mountPath": "/var/run/byzps", "readOnly": True}
#: Where a client pod finds its tokens.
CREDENTIALS_DIR = "/var/run/byzps/credentials"
CREDENTIALS_MOUNT = {"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True}


def token_secret_name(worker_id: int) -> str:
    """The Kubernetes Secret holding worker `worker_id`'s token under the key "token"."""
    return f"byzps-token-{worker_id}"


def credentials_volume(ids: list[int]) -> dict[str, Any]:
    """A volume of exactly the tokens of `ids`, as worker-ID.token files: a projection of their
    Secrets (one for a worker, several for the cohort)."""
    sources = [
        {
            "secret": {
                "name": token_secret_name(i),
                "items": [{"key": "token", "path": token_file_name(i)}],
            }
        }
        for i in ids
    ]
    return {"name": "credentials", "projected": {"sources": sources}}


def kubernetes_objects(config: RunConfig) -> dict[str, list[dict[str, Any]]]:
    """The run's Kubernetes objects by file: server (volume claim, Service, Job), workers (one
    Job per honest worker id, each mounting that id's token only) and, unless the run has no
    Byzantine workers, attack (one Job mounting the cohort's tokens only)."""
    run_volume = {"name": "run", "configMap": {"name": "byzps-run"}}
    run_mount = {"name": "run", "mountPath": "/etc/byzps/run", "readOnly": True}
    server = _container(
        "server",
        server_argv("/var/run/byzps/secret"),
        [{"name": "data", "mountPath": "/data"}, run_mount, SECRET_MOUNT],
        "1",
        "1Gi",
        "4Gi",
    )
    server["ports"] = [{"name": "grpc", "containerPort": PORT}]
    server["readinessProbe"] = {"grpc": {"port": PORT}, "periodSeconds": 5}
    objects = {
        "server": [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "byzps-server-data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "byzps-server"},
                "spec": {
                    "selector": {"app.kubernetes.io/component": "server"},
                    "ports": [{"name": "grpc", "port": PORT, "targetPort": "grpc"}],
                },
            },
            _job(
                "byzps-server",
                "server",
                server,
                [
                    {"name": "data", "persistentVolumeClaim": {"claimName": "byzps-server-data"}},
                    run_volume,
                    SECRET_VOLUME,
                ],
                {"fsGroup": 10001},
                backoffLimit=10,
            ),
        ],
        "workers": [],
    }
    server_address = f"byzps-server:{PORT}"
    for role, ids in holders(config).items():
        args = client_argv(role, ids, server_address, CREDENTIALS_DIR)
        if role == COHORT:
            container = _container("attack", args, [CREDENTIALS_MOUNT], "500m", "512Mi", "2Gi")
            volumes = [credentials_volume(ids)]
            objects["attack"] = [
                _job("byzps-attack", "attack", container, volumes, {}, backoffLimit=10)
            ]
            continue
        container = _container(
            "worker",
            [*args, "--checkpoint-dir", "/state"],
            [{"name": "state", "mountPath": "/state"}, CREDENTIALS_MOUNT],
            "500m",
            "512Mi",
            "2Gi",
        )
        volumes = [{"name": "state", "emptyDir": {}}, credentials_volume(ids)]
        objects["workers"].append(
            _job(f"byzps-{role}", "worker", container, volumes, {}, backoffLimit=4)
        )
    return objects


def split_image(image: str) -> tuple[str, str]:
    """(name, tag) of an image reference; a ':' before the last '/' is a registry's port, not a
    tag (registry:5000/byzps has no tag: "latest")."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return name, tag


def kustomization(files: list[str], image: str) -> dict[str, Any]:
    name, tag = split_image(image)
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "labels": [
            {"pairs": {"app.kubernetes.io/name": "byzps", "app.kubernetes.io/part-of": "byzps"}}
        ],
        "resources": [f"{f}.yaml" for f in files],
        "configMapGenerator": [{"name": "byzps-run", "files": ["run.toml"]}],
        "images": [{"name": "byzps", "newName": name, "newTag": tag}],
    }
