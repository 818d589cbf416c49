#!/usr/bin/env bash
# The project's test command: set-up without the release build, then format
# check, clippy and the workspace tests. Extra arguments go to `cargo test`,
# e.g. `scripts/test.sh -p shardbox-worker -- --nocapture`.
set -euo pipefail

cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "scripts/setup.sh --no-build"
scripts/setup.sh --no-build

# The rootfs that setup.sh maintains; sandbox tests read this variable.
SHARDBOX_ROOTFS="${SHARDBOX_CACHE:-/var/cache/shardbox}/rootfs/python-bookworm"
if [[ ! -f "$SHARDBOX_ROOTFS/.shardbox-id" ]]; then
    echo "test.sh: setup.sh left no rootfs at $SHARDBOX_ROOTFS" >&2
    exit 1
fi
export SHARDBOX_ROOTFS

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace${*:+ $*}"
cargo test --workspace "$@"
