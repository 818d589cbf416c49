#!/usr/bin/env bash
# Peer baseline: Ray no-op task throughput.
#
# Creates (once) a private virtual environment with a pinned Ray from PyPI at
# $SHARDBOX_RAY_VENV (default /var/cache/shardbox/ray-venv), then runs
# ray_noop.py with that environment's python, passing all arguments through:
#
#   bench/peers/ray_noop.sh [--tasks N] [--cpus C]
#
# stdout: exactly one JSON line from ray_noop.py.  Everything else: stderr.
# Idempotent: a marker file naming the pinned version lets later runs skip the
# install.  The venv is used by this benchmark only.
set -euo pipefail

RAY_VERSION="2.60.0"
VENV="${SHARDBOX_RAY_VENV:-/var/cache/shardbox/ray-venv}"
MARKER="$VENV/.shardbox-ray-$RAY_VERSION"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "ray_noop.sh: $*" >&2; }

# Pick a python3 that can create a venv with pip.  Debian's own python3 needs
# the python3-venv package for that (it provides ensurepip).
pick_python() {
    local py="${PYTHON:-python3}"
    if "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        echo "$py"; return
    fi
    log "$py lacks the venv/ensurepip modules; installing Debian's python3-venv"
    if [ "$(id -u)" -ne 0 ]; then
        log "run as root, or: sudo apt-get install -y python3-venv"; exit 1
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    if "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        echo "$py"
    else
        # e.g. a pyenv python without ensurepip: fall back to Debian's python3
        echo /usr/bin/python3
    fi
}

install_venv() {
    local py t0 t1
    py="$(pick_python)"
    t0=$(date +%s.%N)
    log "creating $VENV with ray==$RAY_VERSION (using $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])'))"
    rm -rf "$VENV"   # partial or older install: start clean (this venv is ours only)
    mkdir -p "$(dirname "$VENV")"
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        "ray==$RAY_VERSION" >&2
    "$VENV/bin/python" -c "import ray, sys; sys.exit(ray.__version__ != '$RAY_VERSION')"
    touch "$MARKER"
    t1=$(date +%s.%N)
    log "install took $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s; venv size $(du -sh "$VENV" | cut -f1)"
}

if [ -f "$MARKER" ] && [ -x "$VENV/bin/python" ]; then
    log "ray==$RAY_VERSION already installed in $VENV; skipping install"
else
    mkdir -p "$(dirname "$VENV")"
    # Serialise concurrent first runs.
    exec 9>"$(dirname "$VENV")/.ray-venv.lock"
    flock 9
    if [ -f "$MARKER" ] && [ -x "$VENV/bin/python" ]; then
        log "ray==$RAY_VERSION installed by a concurrent run; skipping install"
    else
        install_venv
    fi
    flock -u 9
    exec 9>&-
fi

# No usage-stats reporting (there is no network beyond package registries).
export RAY_USAGE_STATS_ENABLED=0
exec "$VENV/bin/python" "$HERE/ray_noop.py" "$@"
