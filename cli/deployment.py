"""Deployment manifests for a run: a Compose project and Kubernetes Jobs, derived from its config.

Why generated: the ids are the run's arithmetic — n workers, the first h = n − f honest (ids
0 … h−1), one cohort process holding ids h … n−1 (none under "na") — and hand-edited manifests
drift from the config they deploy. `byzps deploy` writes them from the config, and the copies
in deploy/ are this module's output for the README's main job (tests/test_deploy.py checks both
that they are current and that they pass the real validators).

Pure functions from a RunConfig to plain dicts; the CLI writes them as YAML.
"""

from __future__ import annotations

from typing import Any

from byzps.common.config import RunConfig

PORT = 50051
SECRET = "byzps_secret"
#: Where the run config sits inside every container.
CONFIG_PATH = "/etc/byzps/run/run.toml"
#: Workers wait this long for a server that is still starting (image pulls, scheduling).
RETRY_TIMEOUT = "600"


def roles(config: RunConfig, server: str, secret_path: str) -> dict[str, list[str]]:
    """The `byzps` argv of every process of the run, by role name; workers take their id from
    $BYZPS_WORKER_ID."""
    common = [
        "--server",
        server,
        "--secret-file",
        secret_path,
        "--threads",
        "1",
        "--retry-timeout",
        RETRY_TIMEOUT,
    ]
    h, n = config.honest_workers, config.cluster.workers
    argv = {
        "server": [
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
        ],
        "worker": ["worker", *common],
    }
    if n > h:
        argv["attack"] = ["attack", *common, "--count", str(n - h), "--first-id", str(h)]
    return argv


# --------------------------------------------------------------------------- Compose


def compose_project(config: RunConfig, image: str) -> dict[str, Any]:
    """A Compose project: the server (health-checked, results in a volume), one service per
    honest worker id and the cohort; the run config and the secret come from files beside it
    (run.toml, secret)."""
    argv = roles(config, f"server:{PORT}", f"/run/secrets/{SECRET}")
    base = {"image": image, "secrets": [SECRET]}
    after_server = {"depends_on": {"server": {"condition": "service_healthy"}}}
    services: dict[str, Any] = {
        "server": {
            **base,
            "configs": [{"source": "run", "target": CONFIG_PATH}],
            "command": argv["server"],
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
    for k in range(config.honest_workers):
        services[f"worker-{k}"] = {
            **base,
            "command": argv["worker"],
            "environment": {"BYZPS_WORKER_ID": str(k)},
            **after_server,
        }
    if "attack" in argv:
        services["attack"] = {**base, "command": argv["attack"], **after_server}
    return {
        "name": "byzps",
        "services": services,
        "configs": {"run": {"file": "./run.toml"}},
        "secrets": {SECRET: {"file": "./secret"}},
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


SECRET_VOLUME = {"name": "secret", "secret": {"secretName": "byzps-secret"}}
SECRET_MOUNT = {"name": "secret", "mountPath": "/var/run/byzps", "readOnly": True}


def kubernetes_objects(config: RunConfig) -> dict[str, list[dict[str, Any]]]:
    """The run's Kubernetes objects by file: server (volume claim, Service, Job), workers (an
    Indexed Job whose completion index is the worker id) and, unless the run has no Byzantine
    workers, attack (one Job)."""
    argv = roles(config, f"byzps-server:{PORT}", "/var/run/byzps/secret")
    run_volume = {"name": "run", "configMap": {"name": "byzps-run"}}
    run_mount = {"name": "run", "mountPath": "/etc/byzps/run", "readOnly": True}
    server = _container(
        "server",
        argv["server"],
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
        ]
    }
    worker = _container(
        "worker",
        [*argv["worker"], "--checkpoint-dir", "/state"],
        [{"name": "state", "mountPath": "/state"}, SECRET_MOUNT],
        "500m",
        "512Mi",
        "2Gi",
    )
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    worker["env"] = [{"name": "BYZPS_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": index}}}]
    h = config.honest_workers
    objects["workers"] = [
        _job(
            "byzps-workers",
            "worker",
            worker,
            [{"name": "state", "emptyDir": {}}, SECRET_VOLUME],
            {},
            completionMode="Indexed",
            completions=h,
            parallelism=h,
            backoffLimit=2 * h,
        )
    ]
    if "attack" in argv:
        attack = _container("attack", argv["attack"], [SECRET_MOUNT], "500m", "512Mi", "2Gi")
        objects["attack"] = [
            _job("byzps-attack", "attack", attack, [SECRET_VOLUME], {}, backoffLimit=10)
        ]
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
