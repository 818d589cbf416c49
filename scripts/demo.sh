#!/usr/bin/env bash
# End-to-end demo: set everything up (including the release build), turn the
# 164 HumanEval problems with their reference solutions into a job batch, and
# run that batch through shardbox's gVisor sandboxes.
#
#   scripts/demo.sh [--out FILE] [-- EXTRA ARGS FOR `shardbox run`]
#
# Results go to FILE (default: humaneval-results.jsonl in the current
# directory). The batch is written to
# ${SHARDBOX_CACHE:-/var/cache/shardbox}/humaneval/humaneval.jsonl.
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

out=humaneval-results.jsonl
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out)
            if [[ $# -lt 2 || -z "$2" ]]; then
                echo "demo.sh: --out needs a file name" >&2
                exit 2
            fi
            out=$2
            shift
            ;;
        --out=*)
            out=${1#--out=}
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            extra=("$@")
            break
            ;;
        *)
            echo "demo.sh: unknown argument: $1" >&2
            usage >&2
            exit 2
            ;;
    esac
    shift
done

# Stay in the caller's directory so a relative --out lands where they expect;
# reach the repository through an absolute path instead.
repo_root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SHARDBOX_CACHE:-/var/cache/shardbox}
batch="$cache/humaneval/humaneval.jsonl"

# setup.sh builds from the repository root, so a relative CARGO_TARGET_DIR is
# relative to it as well.
target_dir=${CARGO_TARGET_DIR:-target}
[[ "$target_dir" = /* ]] || target_dir="$repo_root/$target_dir"
shardbox="$target_dir/release/shardbox"

echo "== setup"
"$repo_root/scripts/setup.sh"

if [[ ! -x "$shardbox" ]]; then
    echo "demo.sh: the build finished but $shardbox is missing" >&2
    exit 1
fi

echo "== batch"
python3 "$repo_root/scripts/humaneval.py" --variant canonical --out "$batch"

echo "== run ($(wc -l <"$batch") jobs, results to $out)"
start=$SECONDS
"$shardbox" run "$batch" --out "$out" "${extra[@]}"
echo "demo.sh: finished in $((SECONDS - start)) s; results in $out"
