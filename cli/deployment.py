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

import shlex
from collections.abc import Callable, Sequence
from typing import Any

from byzps.common.config import RunConfig
from byzps.common.credentials import token_file_name

PORT = 50051
#: The Compose secret of the master secret (the server's file ./secret).
SECRET = "byzps_secret"
#: Where the run config sits inside every container.
CONFIG_PATH = "/etc/byzps/run/run.toml"
#: Workers wait this long for a server that is still starting (image pulls, scheduling), and
#: the server as long for all n workers to register before round 0 opens: its default (60 s)
#: would open it without workers whose containers are still starting, and the run would then
#: differ from the same config simulated (every worker there from round 0).
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


def server_roles(config: RunConfig) -> list[str]:
    """The server processes' role names in rank order: "server", or "server-R" for each shard
    of a sharded run (cluster.shards > 1)."""
    shards = config.cluster.shards
    return ["server"] if shards == 1 else [f"server-{rank}" for rank in range(shards)]


def shard_port(rank: int) -> int:
    """Shard `rank`'s port: one each, so that all shards may share one host (a pod, a node)."""
    return PORT + rank


def shard_addresses(config: RunConfig, host: Callable[[str], str]) -> list[str]:
    """Every server process's address in rank order, `host(role)` naming where it runs."""
    return [f"{host(role)}:{shard_port(r)}" for r, role in enumerate(server_roles(config))]


def server_argv(secret_path: str, rank: int = 0, peers: Sequence[str] = ()) -> list[str]:
    """The server's `byzps` argv: the run config, the master secret, results under /data/run;
    shard `rank` of a sharded run also gets its rank and every shard's address (`peers`)."""
    sharding = ["--shard", str(rank), "--peers", ",".join(peers)] if peers else []
    return [
        "server",
        "--config",
        CONFIG_PATH,
        "--listen",
        f"0.0.0.0:{shard_port(rank)}",
        "--out",
        "/data/run",
        "--resume",
        "--secret-file",
        secret_path,
        "--linger",
        "60",
        "--startup-timeout",
        RETRY_TIMEOUT,
        *sharding,
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
    """A Compose project: the server (health-checked, results in a volume) — or each shard of a
    sharded run, every one with the master secret (the shards' peer token derives from it) and
    a volume of its own, rank 0's holding the run's results — one service per honest worker id
    and the cohort; the run config, the master secret and the tokens come from files beside it
    (run.toml, secret, credentials/worker-ID.token), each token mounted in the one service that
    holds its id."""
    roles = server_roles(config)
    addresses = shard_addresses(config, lambda role: role)
    peers = addresses if len(roles) > 1 else []
    after_server = {"depends_on": {r: {"condition": "service_healthy"} for r in roles}}
    services: dict[str, Any] = {}
    for rank, role in enumerate(roles):
        services[role] = {
            "image": image,
            "secrets": [SECRET],
            "configs": [{"source": "run", "target": CONFIG_PATH}],
            "command": server_argv(f"{COMPOSE_SECRETS}/{SECRET}", rank, peers),
            "volumes": [f"{role}-data:/data"],
            "healthcheck": {
                "test": [
                    "CMD",
                    "byzps",
                    "status",
                    "--server",
                    f"127.0.0.1:{shard_port(rank)}",
                    "--timeout",
                    "3",
                ],
                "interval": "5s",
                "timeout": "10s",
                "retries": 30,
                "start_period": "60s",
            },
        }
    for role, ids in holders(config).items():
        services[role] = {
            "image": image,
            "secrets": [{"source": token_secret(i), "target": token_file_name(i)} for i in ids],
            "command": client_argv(role, ids, ",".join(addresses), COMPOSE_SECRETS),
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
        "volumes": {f"{role}-data": {} for role in roles},
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


def _server_objects(role: str, rank: int, peers: Sequence[str]) -> list[dict[str, Any]]:
    """One server process's volume claim, Service and Job (`role` "server", or "server-R" for
    shard R of a sharded run, with every shard's address in `peers`)."""
    name, port = f"byzps-{role}", shard_port(rank)
    run_volume = {"name": "run", "configMap": {"name": "byzps-run"}}
    run_mount = {"name": "run", "mountPath": "/etc/byzps/run", "readOnly": True}
    server = _container(
        "server",
        server_argv("/var/run/byzps/secret", rank, peers),
        [{"name": "data", "mountPath": "/data"}, run_mount, SECRET_MOUNT],
        "1",
        "1Gi",
        "4Gi",
    )
    server["ports"] = [{"name": "grpc", "containerPort": port}]
    server["readinessProbe"] = {"grpc": {"port": port}, "periodSeconds": 5}
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{name}-data"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {
                "selector": {"app.kubernetes.io/component": role},
                "ports": [{"name": "grpc", "port": port, "targetPort": "grpc"}],
            },
        },
        _job(
            name,
            role,
            server,
            [
                {"name": "data", "persistentVolumeClaim": {"claimName": f"{name}-data"}},
                run_volume,
                SECRET_VOLUME,
            ],
            {"fsGroup": 10001},
            backoffLimit=10,
        ),
    ]


def kubernetes_objects(config: RunConfig) -> dict[str, list[dict[str, Any]]]:
    """The run's Kubernetes objects by file: server (volume claim, Service, Job; one of each per
    shard of a sharded run), workers (one Job per honest worker id, each mounting that id's
    token only) and, unless the run has no Byzantine workers, attack (one Job mounting the
    cohort's tokens only)."""
    roles = server_roles(config)
    addresses = shard_addresses(config, lambda role: f"byzps-{role}")
    peers = addresses if len(roles) > 1 else []
    servers = [o for rank, role in enumerate(roles) for o in _server_objects(role, rank, peers)]
    objects: dict[str, list[dict[str, Any]]] = {"server": servers, "workers": []}
    for role, ids in holders(config).items():
        args = client_argv(role, ids, ",".join(addresses), CREDENTIALS_DIR)
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


# --------------------------------------------------------------------------- podman (one host)

#: Every container of the pod: non-root, read-only root filesystem, no capabilities, no way to
#: gain privileges, a writable /tmp only, and an init (catatonit) as PID 1 that forwards
#: SIGTERM, so `podman stop` ends byzps through its graceful path.
HARDENING = ("--init --read-only --cap-drop=ALL --security-opt=no-new-privileges "
             "--user 10001 --tmpfs /tmp")  # fmt: skip


def _mount(source: str, target: str, mode: str = "ro") -> str:
    return f'-v "$HERE/{source}:{target}:{mode}"'


def podman_script(config: RunConfig, image: str) -> str:
    """A bash script that runs the Compose project of `config` with podman, as one pod.

    Why: podman runs no Compose daemon, and podman-compose puts services on a bridge network;
    a pod created with `--network none` gives its containers one loopback shared by them alone,
    so nothing the run sends leaves the pod, and `server` (the Compose service name every
    client dials) is the pod's hostname, which resolves to that loopback (podman 4.3 ignores
    `--add-host` on such a pod). Every container runs the service's own command from
    `compose_project`, mounts the service's own secrets where Compose would, and is hardened
    (HARDENING); the server's /data is DATA (results, checkpoints, write-ahead log).
    """
    project = compose_project(config, "$IMAGE")
    roles = server_roles(config)
    # One loopback for the whole pod, whose hostname is "server": every shard is reached there,
    # each on its own port (shard_port), where Compose reaches it by its service name.
    here = {f"{role}:": "server:" for role in roles if role != "server"}
    files = {name: spec["file"].removeprefix("./") for name, spec in project["secrets"].items()}
    configs = {name: spec["file"].removeprefix("./") for name, spec in project["configs"].items()}
    lines = []
    for role, service in project["services"].items():
        words = []  # -v mounts, then the image and the service's command
        for secret in service["secrets"]:
            source = secret if isinstance(secret, str) else secret["source"]
            target = source if isinstance(secret, str) else secret.get("target", source)
            words.append(_mount(files[source], f"{COMPOSE_SECRETS}/{target}"))
        for conf in service.get("configs", []):
            words.append(_mount(configs[conf["source"]], conf["target"]))
        if service.get("volumes"):  # the server's DATA; each shard's DATA/server-R
            where = "$DATA" if role == "server" else f"$DATA/{role}"
            words.append(f'-v "{where}:/data:rw"')
        command = [_replace_all(word, here) for word in service["command"]]
        words.append(f'"$IMAGE" {shlex.join(command)}')
        lines.append(f'podman run -d --pod "$POD" --name "$POD-{role}" $HARDENING \\\n    '
                     + " \\\n    ".join(words))  # fmt: skip
        if role in roles:
            health = shlex.join(service["healthcheck"]["test"][1:])  # after "CMD"
            lines.append(f'wait_healthy "$POD-{role}" {health}')
    if len(roles) > 1:
        dirs = " ".join(f'"$DATA/{role}"' for role in roles)
        lines.insert(0, f"mkdir -p {dirs}  # each shard's /data (owned by uid 10001, as DATA)")
    body = "\n".join(lines)
    servers = " ".join(f'"$POD-{role}"' for role in roles)
    return f"""#!/usr/bin/env bash
# Generated by `byzps deploy podman` from the run.toml beside it (the Compose project of the
# same run, as one podman pod): change the run config and regenerate rather than edit.
#
#   bash pod.sh up      start the pod: server (until healthy), honest workers, cohort
#   bash pod.sh wait    wait for every client to finish and the server to end; exit code 0 iff
#                       all did so with 0
#   bash pod.sh down    stop (SIGTERM, graceful) and remove the pod
#
# Beside this file: run.toml, secret, credentials/worker-K.token (deploy/README.md), all
# readable by uid 10001, and DATA (default ./data, owned by uid 10001) for the server's results.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
POD=${{BYZPS_POD:-byzps}}
IMAGE=${{BYZPS_IMAGE:-{image}}}
DATA=${{BYZPS_DATA:-$HERE/data}}
HARDENING="{HARDENING}"

wait_healthy() {{  # NAME CMD...: until CMD succeeds inside container NAME (the healthcheck)
    local name=$1; shift
    for _ in $(seq 1 120); do
        podman exec "$name" "$@" >/dev/null 2>&1 && return 0
        [ "$(podman inspect -f '{{{{.State.Running}}}}' "$name")" = true ] || break
        sleep 1
    done
    echo "$name did not become healthy" >&2; podman logs --tail 20 "$name" >&2; return 1
}}

up() {{
    podman pod create --name "$POD" --network none --hostname server >/dev/null
{_indent(body)}
}}

wait_all() {{  # every client, then end the server's linger: SIGTERM, a graceful stop
    local rc=0 name code start
    for name in $(podman ps -a --filter "pod=$POD" --format '{{{{.Names}}}}' | sort); do
        case $name in "$POD-server" | "$POD-server-"* | *-infra) continue ;; esac
        code=$(podman wait "$name")
        [ "$code" = 0 ] || {{ echo "$name exited with $code" >&2; rc=1; }}
    done
    for name in {servers}; do
        start=$(date +%s%N)
        podman stop -t 30 "$name" >/dev/null
        code=$(podman inspect -f '{{{{.State.ExitCode}}}}' "$name")
        echo "${{name#"$POD-"}} stopped by SIGTERM in $(( ($(date +%s%N) - start) / 1000000 ))" \\
            "ms, exit code $code"
        [ "$code" = 0 ] || rc=1
    done
    return $rc
}}

case ${{1:-}} in
    up) up ;;
    wait) wait_all ;;
    down) podman pod rm -f -t 10 "$POD" >/dev/null ;;
    *) echo "usage: $0 up|wait|down" >&2; exit 2 ;;
esac
"""


def _replace_all(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" if line else line for line in text.splitlines())


# --------------------------------------------------------------------------- Slurm


def slurm_script(config: RunConfig) -> str:
    """An sbatch script for `config`: one job of h + 2 tasks — the server step, one worker step
    of h tasks (worker id = SLURM_PROCID) and, unless the run has no Byzantine workers, the
    cohort step holding ids h … n−1.

    Why so: the steps overlap on the job's allocation (`srun --overlap`), so the server's step
    does not keep the workers' from starting; the ranks of one `srun` are exactly the honest ids;
    every file lives in RUN_DIR, a path every node of the job sees (run config, secret, tokens,
    the server's results and checkpoints, each worker's checkpoint), so a requeued job (node
    failure, preemption: SLURM_RESTART_COUNT > 0) restarts the server with --resume and the
    workers from their checkpoints, losing no acknowledged update.
    """
    h = config.honest_workers
    roles = holders(config)
    shards = config.cluster.shards
    client = ('--server "$SERVER" --threads "${SLURM_CPUS_PER_TASK:-1}" '
              f'--retry-timeout {RETRY_TIMEOUT}')  # fmt: skip
    if shards == 1:
        servers = [
            f'srun --overlap --nodes=1 --ntasks=1 --nodelist="$SERVER_NODE" --job-name=server '
            f'\\\n    "$BYZPS" {" ".join(server_argv_slurm())} "${{RESUME[@]}}" &\n'
            "SERVERS=($!)"
        ]
        where = "SERVER=${BYZPS_SERVER_HOST:-$SERVER_NODE}:$PORT"
    else:  # shard R on node R mod N, port PORT + R; every shard's address in $SERVER
        servers = [
            f'srun --overlap --nodes=1 --ntasks=1 --nodelist="${{SHARD_NODES[{r}]}}" '
            f'--job-name=server-{r} \\\n    "$BYZPS" '
            f'{" ".join(server_argv_slurm(r))} "${{RESUME[@]}}" &\n'
            + ("SERVERS=($!)" if r == 0 else "SERVERS+=($!)")
            for r in range(shards)
        ]
        where = (
            'NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))\n'
            "SHARD_NODES=() SERVER=\n"
            f"for r in $(seq 0 {shards - 1}); do\n"
            '    SHARD_NODES+=("${NODES[r % ${#NODES[@]}]}")\n'
            '    SERVER+="${SERVER:+,}${BYZPS_SERVER_HOST:-${SHARD_NODES[r]}}:$((PORT + r))"\n'
            "done"
        )
    steps = [
        *servers,
        f'srun --overlap --ntasks={h} --job-name=workers bash -c \'exec "$BYZPS" worker '
        f"{client} \\\n"
        '    --id "$SLURM_PROCID" --token-file "$RUN_DIR/credentials/worker-$SLURM_PROCID.token"'
        ' \\\n    --checkpoint-dir "$RUN_DIR/checkpoints/worker-$SLURM_PROCID"\' &\n'
        "CLIENTS=($!)",
    ]
    if COHORT in roles:
        ids = roles[COHORT]
        steps.append(
            f'srun --overlap --ntasks=1 --job-name=attack "$BYZPS" attack {client} \\\n'
            f'    --token-dir "$RUN_DIR/credentials" --count {len(ids)} --first-id {ids[0]} &\n'
            "CLIENTS+=($!)"
        )
    tasks = h + shards + (COHORT in roles)
    return f"""#!/bin/bash
# Generated by `byzps deploy slurm` from the run.toml beside it: change the run config and
# regenerate rather than edit (every id and count here follows from the config).
#
#   sbatch [--nodes=N] byzps.sbatch            (deploy/README.md: nodes, address, TLS)
#
# RUN_DIR (default: the job's working directory: submit from there, or sbatch --chdir) must be
# on a filesystem every node sees; it holds run.toml, secret (the server's),
# credentials/worker-K.token, the server's results and checkpoints (server/) and the workers'
# checkpoints (checkpoints/).
#SBATCH --job-name=byzps
#SBATCH --ntasks={tasks}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=byzps-%j.out
set -euo pipefail
RUN_DIR=${{BYZPS_RUN_DIR:-$PWD}}
BYZPS=${{BYZPS:-byzps}}
PORT=${{BYZPS_PORT:-{PORT}}}
SERVER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
{where}
export RUN_DIR BYZPS SERVER
RESUME=()
if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ]; then RESUME=(--resume); fi
mkdir -p "$RUN_DIR/checkpoints"

{chr(10).join(steps)}

rc=0
for pid in "${{CLIENTS[@]}}"; do wait "$pid" || rc=$?; done
# Every client is done, so the run is: end the server's linger with SIGTERM to its task (not to
# srun, which would cancel the step): it stops gracefully, writes a final checkpoint, exits 0.
# A sharded run's shards are the steps server-0, server-1, …
for step in $(squeue --steps --jobs "$SLURM_JOB_ID" --noheader --format '%i %j' \\
    | awk '$2 ~ /^server(-[0-9]+)?$/ {{ print $1 }}'); do
    scancel --signal=TERM "$step" || true
done
for pid in "${{SERVERS[@]}}"; do wait "$pid" || rc=$?; done
exit "$rc"
"""


def server_argv_slurm(shard: int | None = None) -> list[str]:
    """The server's arguments under Slurm: as in a container (server_argv), but every path in
    RUN_DIR and the port from PORT (quoted for the script); --resume only on requeue. Shard R
    of a sharded run: its files in RUN_DIR/server-R, port PORT + R, every shard's address from
    $SERVER."""
    if shard is None:
        argv = server_argv('"$RUN_DIR/secret"')
        out, port = '"$RUN_DIR/server"', '"0.0.0.0:$PORT"'
    else:
        argv = server_argv('"$RUN_DIR/secret"', shard, ['"$SERVER"'])
        out, port = f'"$RUN_DIR/server-{shard}"', f'"0.0.0.0:$((PORT + {shard}))"'
    replace = {CONFIG_PATH: '"$RUN_DIR/run.toml"', "/data/run": out,
               f"0.0.0.0:{shard_port(shard or 0)}": port}  # fmt: skip
    return [replace.get(a, a) for a in argv if a != "--resume"]
