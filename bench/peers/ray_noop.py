#!/usr/bin/env python3
"""Peer baseline for shardbox's scheduler benchmark: Ray no-op task throughput.

Starts a private local Ray instance, warms it up, then submits N no-op remote
tasks in chunks, ray.get()s each chunk, and times the whole batch.

stdout: exactly one JSON line
  {"peer":"ray","version":...,"tasks":N,"seconds":...,"tasks_per_s":...,"peak_rss_mb":...}
Everything else (Ray's own output included) goes to stderr.

peak_rss_mb is the largest sum of resident set sizes of this driver and every
process Ray started for it (GCS, raylet, workers, agents), sampled from /proc
every 0.25 s from ray.init() to ray.shutdown().  Summing RSS counts shared
pages (libraries, the object store's shared memory) once per process, so it is
an upper bound.  The field is omitted if /proc cannot be read.

On exit Ray is shut down, and any process it started that is still alive
after a grace period is killed by PID (only processes this run started).

Run it through ray_noop.sh, which provides the pinned Ray in a venv.
"""

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

CHUNK = 1000          # tasks submitted before a ray.get of that chunk
SAMPLE_EVERY = 0.25   # seconds between RSS samples
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg):
    print(f"ray_noop: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- /proc helpers

def _stat(pid):
    """(ppid, starttime) of pid from /proc/<pid>/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parens: split after the last ')'.
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[1]), int(rest[19])  # fields 4 (ppid) and 22 (starttime)


def _rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root):
    """{pid: starttime} of every living descendant of root (root excluded)."""
    children = {}
    starts = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is None:
            continue
        children.setdefault(st[0], []).append(pid)
        starts[pid] = st[1]
    out = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out[pid] = starts[pid]
        todo.extend(children.get(pid, ()))
    return out


def alive_same(pid, start):
    """True if pid is still the very process we saw (guards against PID reuse)."""
    st = _stat(pid)
    return st is not None and st[1] == start


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Samples the summed RSS of this process and its descendants."""

    def __init__(self):
        super().__init__(name="rss-sampler", daemon=True)
        self.me = os.getpid()
        self.seen = {}          # pid -> starttime of every Ray process observed
        self.peak = 0
        self.ok = os.path.isdir(f"/proc/{self.me}")
        self._halt = threading.Event()

    def sample(self):
        procs = descendants(self.me)
        self.seen.update(procs)
        total = _rss_bytes(self.me) + sum(_rss_bytes(p) for p in procs)
        self.peak = max(self.peak, total)

    def run(self):
        while not self._halt.is_set():
            try:
                self.sample()
            except Exception as e:  # never let sampling break the benchmark
                log(f"rss sampling failed: {e!r}")
                self.ok = False
                return
            self._halt.wait(SAMPLE_EVERY)

    def stop(self):
        self._halt.set()
        self.join()


def reap(sampler, session_tag, grace=10.0):
    """Make sure no process this run started is left; kill leftovers by PID."""
    me = os.getpid()
    mine = dict(sampler.seen)
    mine.update(descendants(me))

    def leftovers():
        left = {p: s for p, s in mine.items() if alive_same(p, s)}
        # Workers orphaned after the raylet exited are no longer our
        # descendants and may have been spawned after the last sample: find
        # them by our unique Ray session name on their command line.
        if session_tag:
            for pid in _all_pids():
                if pid != me and pid not in left and session_tag in _cmdline(pid):
                    st = _stat(pid)
                    if st is not None:
                        left[pid] = st[1]
                        mine[pid] = st[1]
        # Our own zombie children are reaped by waitpid below, not killed.
        return left

    deadline = time.monotonic() + grace
    while True:
        _reap_zombies()
        left = leftovers()
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not left:
            break
        for pid, start in left.items():
            if alive_same(pid, start):
                log(f"killing leftover Ray process {pid} ({sig.name}): {_cmdline(pid)[:120]}")
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        time.sleep(2.0)
        _reap_zombies()
        left = leftovers()
    if left:
        log(f"WARNING: Ray processes still present: {sorted(left)}")
    return not left


def _reap_zombies():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# ---------------------------------------------------------------- benchmark

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=20000, help="no-op tasks to time (default 20000)")
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)),
                    help="num_cpus given to Ray (default: cores available)")
    args = ap.parse_args()
    if args.tasks < 1 or args.cpus < 1:
        ap.error("--tasks and --cpus must be positive")

    # Keep fd 1 for our single JSON line; point fd 1 (inherited by every Ray
    # process) and sys.stdout at stderr.
    sys.stdout.flush()
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    @ray.remote
    def noop():
        return None

    sampler = Sampler()
    session_tag = None
    result = None
    try:
        log(f"ray {ray.__version__}, num_cpus={args.cpus}, tasks={args.tasks}")
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        try:
            session_tag = os.path.basename(ray._private.worker._global_node.get_session_dir_path())
        except Exception:
            session_tag = None
        if sampler.ok:
            sampler.start()

        # Warm-up: start the worker pool and exercise the submit/get path.
        warm = max(1000, 200 * args.cpus)
        t0 = time.perf_counter()
        for _ in range(2):
            ray.get([noop.remote() for _ in range(warm)])
        log(f"warm-up: 2 x {warm} tasks in {time.perf_counter() - t0:.2f} s")

        t0 = time.perf_counter()
        left = args.tasks
        while left:
            n = min(CHUNK, left)
            ray.get([noop.remote() for _ in range(n)])
            left -= n
        seconds = time.perf_counter() - t0

        result = {
            "peer": "ray",
            "version": ray.__version__,
            "tasks": args.tasks,
            "seconds": round(seconds, 4),
            "tasks_per_s": round(args.tasks / seconds, 1),
        }
        log(f"{args.tasks} tasks in {seconds:.3f} s = {args.tasks / seconds:.0f} tasks/s")
    finally:
        if sampler.is_alive():
            try:
                sampler.sample()  # one last sample at the end of the run
            except Exception:
                pass
            sampler.stop()
        try:
            ray.shutdown()
        except Exception as e:
            log(f"ray.shutdown failed: {e!r}")
        clean = reap(sampler, session_tag)
        log("no Ray process left running" if clean else "Ray processes left running")

    if sampler.ok and sampler.peak:
        result["peak_rss_mb"] = round(sampler.peak / 2**20, 1)
    result_out.write(json.dumps(result, separators=(",", ":")) + "\n")
    result_out.flush()
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
