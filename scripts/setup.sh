#!/usr/bin/env bash
# Prepare a machine to build and run shardbox. Safe to run again: every step
# checks whether it is already done and prints one line saying what it did.
#
#   scripts/setup.sh [--no-build] [--sci]
#
#   --sci            also build the heavy rootfs of the benchmarks' `python-sci`
#                    template (python3 and python3-numpy) in
#                    $SHARDBOX_CACHE/rootfs/python-sci-bookworm
#
# Environment:
#   SHARDBOX_CACHE   cache root (default /var/cache/shardbox); the default
#                    Python rootfs lands in $SHARDBOX_CACHE/rootfs/python-bookworm
set -euo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

build=1
sci=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-build) build=0 ;;
        --sci) sci=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "setup.sh: unknown argument: $1" >&2
            usage >&2
            exit 2
            ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
repo_root=$(pwd)

cache=${SHARDBOX_CACHE:-/var/cache/shardbox}
rootfs_parent="$cache/rootfs"

say() { printf 'setup: %-24s %s\n' "$1" "$2"; }

# --- 1. host packages -------------------------------------------------------
# Command name -> Debian package name (identical today, kept apart on purpose).
missing=()
for cmd in runsc mmdebstrap; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    say "packages" "skipped (runsc and mmdebstrap already installed)"
else
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup.sh: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null >/dev/null
    # With recommends, as verified on these machines (mmdebstrap recommends arch-test, uidmap).
    apt-get install -y -q "${missing[@]}" </dev/null >/dev/null
    for cmd in "${missing[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || {
            echo "setup.sh: $cmd still not found after apt-get install" >&2
            exit 1
        }
    done
    say "packages" "done (installed ${missing[*]})"
fi

# --- 2. Python rootfs (and the heavy one with --sci) -----------------------
write_id() {
    # One line: a random id for this rootfs build, then the UTC build time.
    local uuid
    uuid=$(cat /proc/sys/kernel/random/uuid)
    printf '%s %s\n' "$uuid" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$1/.shardbox-id"
}

# True when something is still mounted at or below the given directory.
has_mounts() {
    local dir
    dir=$(realpath -m "$1")
    awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { found = 1 } END { exit !found }' \
        /proc/self/mountinfo
}

# Builds the rootfs NAME under $rootfs_parent with mmdebstrap (minbase plus the comma-separated
# Debian packages INCLUDE), once: a finished rootfs carries its .shardbox-id and is left alone.
build_rootfs() {
    local name=$1 include=$2 label=$3
    local dir="$rootfs_parent/$name"
    # `tmp` stays global: the EXIT trap that removes it may run outside this function.
    local stale stale_removed start log note wrap
    if [[ -f "$dir/.shardbox-id" ]]; then
        say "$label" "skipped ($dir exists, id $(cut -d' ' -f1 "$dir/.shardbox-id"))"
    else
        mkdir -p "$rootfs_parent"
        # Serialise concurrent setup runs on the rootfs step.
        exec 9>"$rootfs_parent/.$name.lock"
        if ! flock -w 900 9; then
            echo "setup.sh: timed out waiting for $rootfs_parent/.$name.lock" >&2
            exit 1
        fi

        if [[ -f "$dir/.shardbox-id" ]]; then
            say "$label" "skipped (built by a concurrent setup run)"
        elif [[ -e "$dir" ]]; then
            # A rootfs that only ever appears through the final mv is complete,
            # so a directory without the id file was put there some other way.
            echo "setup.sh: $dir exists but has no .shardbox-id; refusing to touch it." >&2
            echo "setup.sh: remove it by hand and run setup.sh again to rebuild it." >&2
            exit 1
        else
            # Leftovers of earlier runs that were killed before their mv. We hold
            # the lock, so no other run can be using them.
            stale_removed=0
            for stale in "$dir".tmp.*; do
                [[ -d "$stale" ]] || continue
                if has_mounts "$stale"; then
                    umount -R "$stale" 2>/dev/null || true
                fi
                if has_mounts "$stale"; then
                    echo "setup.sh: $stale still has mounts below it; clean it up by hand." >&2
                    exit 1
                fi
                rm -rf --one-file-system "$stale"
                stale_removed=$((stale_removed + 1))
            done

            tmp=$(mktemp -d "$dir.tmp.XXXXXX")
            chmod 0755 "$tmp"
            cleanup_tmp() {
                if [[ -n "${tmp:-}" && -d "$tmp" ]] && ! has_mounts "$tmp"; then
                    rm -rf --one-file-system "$tmp"
                fi
            }
            trap cleanup_tmp EXIT
            trap 'exit 130' INT
            trap 'exit 143' TERM

            # Run mmdebstrap (root mode, as root) in a private mount namespace:
            # the /proc, /sys and /dev mounts it makes while building then vanish
            # with it, even on SIGKILL, instead of staying behind on the host.
            wrap=()
            if unshare --mount --propagation private -- true 2>/dev/null; then
                wrap=(unshare --mount --propagation private --)
            fi
            log="$rootfs_parent/$name.build.log"
            start=$SECONDS
            if ! "${wrap[@]}" mmdebstrap --variant=minbase --include="$include" \
                bookworm "$tmp" </dev/null >"$log" 2>&1; then
                echo "setup.sh: mmdebstrap failed; last lines of $log:" >&2
                tail -n 20 "$log" >&2
                exit 1
            fi
            if [[ ! -x "$tmp/usr/bin/python3" ]]; then
                echo "setup.sh: mmdebstrap finished but $tmp/usr/bin/python3 is missing" >&2
                exit 1
            fi
            # The id goes in before the mv: the final path only ever holds a
            # finished rootfs that already carries its id.
            write_id "$tmp"
            mv -T "$tmp" "$dir"
            tmp=
            trap - EXIT INT TERM
            note=""
            if [[ $stale_removed -gt 0 ]]; then
                note=", removed $stale_removed leftover temp dir(s)"
            fi
            say "$label" "done ($dir in $((SECONDS - start)) s, id $(cut -d' ' -f1 "$dir/.shardbox-id")$note)"
        fi
        exec 9>&-
    fi
}

build_rootfs python-bookworm python3 rootfs
if [[ $sci -eq 1 ]]; then
    # The heavy template of the benchmarks (`python-sci`, configs/python-sci.toml).
    build_rootfs python-sci-bookworm python3,python3-numpy "rootfs (sci)"
fi

# --- 3. release build -------------------------------------------------------
if [[ $build -eq 0 ]]; then
    say "build" "skipped (--no-build)"
else
    if ! command -v cargo >/dev/null 2>&1; then
        echo "setup.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
        exit 1
    fi
    cargo_args=(build --release -p shardbox-scheduler)
    if [[ -f "$repo_root/Cargo.lock" ]]; then
        cargo_args+=(--locked)
    fi
    start=$SECONDS
    cargo "${cargo_args[@]}"
    say "build" "done (target/release/shardbox in $((SECONDS - start)) s)"
fi
