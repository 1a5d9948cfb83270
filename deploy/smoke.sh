#!/usr/bin/env bash
# The image built and run for real, with podman and no network:
#
#   1. a Debian base image made offline (mmdebstrap from this machine's apt mirror, imported
#      into podman), unless BASE already exists;
#   2. the wheels of byzps and its dependencies fetched on the host (pip download) into
#      deploy/wheels/, and deploy/Dockerfile built with `--network=none` and PIP_NO_INDEX=1;
#   3. the run CONFIG (default: the README's main job) deployed with `byzps deploy podman` (the
#      Compose project as one `--network none` pod): the server, each honest worker and the
#      Byzantine cohort in containers of their own, each hardened (non-root uid 10001, read-only
#      root, all capabilities dropped, an init forwarding SIGTERM) and mounting its own
#      credentials only;
#   4. `byzps simulate` of the same config in the same image, and the final parameters compared
#      (np.allclose with rtol 1e-5, atol 1e-7, as tests/test_cluster.py's launch test);
#   5. the server stopped with SIGTERM once the clients are done: it must exit 0, quickly.
#
# Prints the build time, the run time and the equality figure; exits non-zero on any failure.
# Needs root (rootful podman), podman, runc, catatonit, and mmdebstrap unless BASE exists
# (Debian: apt-get install --no-install-recommends podman runc catatonit mmdebstrap), and
# PYTHON: a Python 3.11 on x86_64 with pip, able to download the wheels (the image's Python is
# Debian bookworm's 3.11). Removes its pod and temporary files whatever happens; keeps the images.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONFIG=${CONFIG:-$ROOT/experiments/cluster/a9a.toml}
IMAGE=${IMAGE:-localhost/byzps:smoke}
BASE=${BASE:-localhost/byzps-base:bookworm}
PYTHON=${PYTHON:-python3}
SUITE=${SUITE:-bookworm}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/deploy/podman/containers.conf}
WORK=$(mktemp -d -t byzps-smoke.XXXXXX)
POD=byzps-smoke-$$

cleanup() {
    podman pod rm -f -t 0 "$POD" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f s", (b - a) / 1000 }'; }

"$PYTHON" -c 'import sys, platform
assert sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64", \
    "PYTHON must be CPython 3.11 on x86_64 (the image is Debian bookworm'\''s), not " + sys.version' \
    || exit 2

# 1. the base image: Debian with python3 and venv, from the apt mirror this machine uses.
if ! podman image exists "$BASE"; then
    t=$(now_ms)
    mirror=${MIRROR:-$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources \
                        2>/dev/null || true)}
    mmdebstrap --quiet --variant=apt --include=python3,python3-venv,passwd \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        "$SUITE" - ${mirror:+"$mirror"} \
        | podman import --change 'CMD ["/usr/bin/python3"]' - "$BASE" >/dev/null
    echo "base image $BASE made in $(since "$t")"
fi

# 2. wheels on the host, then a build with no network at all.
t=$(now_ms)
"$PYTHON" -m pip download -q --only-binary=:all: -d "$ROOT/deploy/wheels" \
    torch==2.13.0 setuptools wheel "$ROOT" 2> >(grep -v 'is ignored' >&2)
echo "wheels fetched in $(since "$t")"
t=$(now_ms)
podman build -q --network=none --build-arg BASE="$BASE" --build-arg PIP_NO_INDEX=1 \
    -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "$ROOT" >/dev/null
echo "image $IMAGE built offline in $(since "$t")" \
     "($(podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"

# 3. the deployment, its credentials and the simulator's reference, all made by the image.
chmod 755 "$WORK"
cp "$CONFIG" "$WORK/config.toml"
chown -R 10001 "$WORK"
tool() {
    podman run --rm --network none --read-only --tmpfs /tmp --cap-drop=ALL --user 10001 \
        -v "$WORK:/w" \
        "$@"
}
tool "$IMAGE" deploy podman --config /w/config.toml --out /w/job --image "$IMAGE" >/dev/null
n=$(tool --entrypoint python3 "$IMAGE" -c \
    'from byzps.common.config import RunConfig; print(RunConfig.load("/w/job/run.toml").cluster.workers)')
tool "$IMAGE" credentials secret --out /w/job/secret >/dev/null
tool "$IMAGE" credentials issue --secret-file /w/job/secret --ids "0-$((n - 1))" \
    --out /w/job/credentials >/dev/null
tool "$IMAGE" simulate --config /w/job/run.toml --out /w/sim >/dev/null
mkdir "$WORK/job/data" && chown 10001 "$WORK/job/data"

t=$(now_ms)
BYZPS_POD=$POD BYZPS_IMAGE=$IMAGE bash "$WORK/job/pod.sh" up >/dev/null
echo "pod $POD up: $(podman ps --filter "pod=$POD" --format '{{.Names}}' | grep -vc infra)" \
     "containers in $(since "$t")"
server=$POD-server
podman inspect -f 'server container: user {{.Config.User}}, read-only root {{.HostConfig.ReadonlyRootfs}}, cap-drop {{.HostConfig.CapDrop}}, init {{.HostConfig.Init}}' "$server"
podman exec "$server" sh -c 'echo "inside: uid $(id -u), CapEff $(grep CapEff /proc/self/status | cut -f2)"; touch /etc/x 2>/dev/null && echo "root fs writable" || echo "root fs refuses writes"'
BYZPS_POD=$POD BYZPS_IMAGE=$IMAGE timeout "$RUN_TIMEOUT" bash "$WORK/job/pod.sh" wait \
    || { for c in $(podman ps -a --filter "pod=$POD" --format '{{.Names}}'); do
             echo "--- $c"; podman logs --tail 15 "$c" 2>&1; done; exit 1; }
echo "run: $(since "$t") from pod creation to the server's exit"

# 4. the run in containers against the simulator, in the same image.
cat > "$WORK/compare.py" <<'PY'
import json

import numpy as np

got, want = np.load("/w/job/data/run/params.npy"), np.load("/w/sim/params.npy")
rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
g, w = (json.loads(open(p).read().splitlines()[-1])
        for p in ("/w/job/data/run/metrics.jsonl", "/w/sim/metrics.jsonl"))
print(f"containers vs simulate: relative error {rel:.3e}, "
      f"max |diff| {float(np.abs(got - want).max()):.3e}, rounds {g['round']}/{w['round']}, "
      f"train_loss {g['train_loss']:.6f}/{w['train_loss']:.6f}")
ok = np.allclose(got, want, rtol=1e-5, atol=1e-7) and g["round"] == w["round"]
raise SystemExit(0 if ok else 1)
PY
tool --entrypoint python3 "$IMAGE" /w/compare.py
echo "container smoke: passed"
