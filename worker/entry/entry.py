"""Shardbox's entry script, run inside every sandbox of the built-in templates.

It warms up (for the `python` kind: imports what code-reward jobs commonly use), says
`{"shardbox":"ready"}` on stdout and then serves the worker's frames on stdin:

  wake\n                  answered by {"shardbox":"awake"}\n once the sandbox runs again after a
                          restore; randomness is reseeded here so that clones of one checkpoint
                          never share it.
  job <n>\n<n bytes>      a JSON envelope {code | argv, files, env, workdir}; everything after it
                          on stdin is the job's own stdin.

The first process (PID 1 of the sandbox) forks at once, before the warm-up: the parent stays a
small reaper that adopts and reaps every orphan of the job, and exits with the job's own status
when the job's process ends; the child warms up and serves the frames.

With a third argument `process`, the entry is instead a supervisor serving many jobs, each as a
child process forked from the warm interpreter (see `supervise` below).

In the default mode, after a job frame the sandbox belongs to that job: its stdout, stderr and exit status are the
job's, observed by the worker outside the sandbox. Frames are read straight from file
descriptor 0, unbuffered, so no byte of the job's stdin is consumed here.
"""

import os
import sys

KIND = sys.argv[1] if len(sys.argv) > 1 else "python"
MODE = sys.argv[2] if len(sys.argv) > 2 else "sandbox"


def reap_until(child):
    """PID 1's loop: reap whatever ends; when `child` ends, end with its status."""
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(125)
        if pid == child:
            if os.WIFSIGNALED(status):
                os._exit(128 + os.WTERMSIG(status))
            os._exit(os.WEXITSTATUS(status))


_child = os.fork()
if _child:
    reap_until(_child)

# The warm-up: modules whose import cost every job would otherwise pay.
import json  # noqa: E402
import random  # noqa: E402

if KIND == "python":
    import abc, array, bisect, collections, copy, dataclasses, datetime, decimal  # noqa
    import enum, fractions, functools, hashlib, heapq, io, itertools, math, numbers  # noqa
    import operator, re, statistics, string, struct, textwrap, time, traceback  # noqa
    import tempfile, threading, typing, unittest, uuid  # noqa
    for _name in filter(None, os.environ.get("SHARDBOX_PRELOAD", "").split(",")):
        __import__(_name)


def read_exact(n):
    chunks = []
    while n > 0:
        chunk = os.read(0, min(n, 1 << 20))
        if not chunk:
            os._exit(120)
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_line():
    line = bytearray()
    while True:
        byte = os.read(0, 1)
        if not byte:
            os._exit(120)
        if byte == b"\n":
            return bytes(line)
        line += byte
        if len(line) > 64:
            os._exit(122)


def reseed():
    random.seed()
    try:
        import tempfile

        tempfile._name_sequence = None
    except Exception:
        pass
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))


def next_job():
    os.write(1, b'{"shardbox":"ready"}\n')
    while True:
        frame = read_line()
        if frame == b"wake":
            reseed()
            os.write(1, b'{"shardbox":"awake"}\n')
        elif frame.startswith(b"job "):
            return json.loads(read_exact(int(frame[4:])))
        else:
            os._exit(121)


def prepare(envelope):
    workdir = envelope.get("workdir", "/work")
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    for path, text in envelope.get("files", {}).items():
        # The worker refuses absolute and '..' paths; this is a second check.
        full = os.path.realpath(os.path.join(workdir, path))
        if not full.startswith(os.path.realpath(workdir) + os.sep):
            sys.stderr.write("shardbox: file path escapes the work directory: %r\n" % path)
            sys.exit(125)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(text)
    os.environ.update(envelope.get("env", {}))


def run_python(code, memory_exit=None):
    import builtins

    sys.argv = ["<job>"]
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": "<job>"}
    try:
        exec(compile(code, "<job>", "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as err:
        import traceback

        traceback.print_exc()
        if memory_exit is not None and isinstance(err, MemoryError):
            sys.exit(memory_exit)
        sys.exit(1)
    sys.exit(0)


def main():
    if MODE == "process":
        supervise()
    envelope = next_job()
    prepare(envelope)
    if "argv" in envelope:
        argv = envelope["argv"]
        try:
            os.execvp(argv[0], argv)
        except OSError as err:
            sys.stderr.write("shardbox: cannot execute %r: %s\n" % (argv[0], err))
            sys.exit(127)
    run_python(envelope.get("code", ""))


# --- process mode ---------------------------------------------------------------------------
#
# Frames from the worker on stdin: `wake` as above, then `job <seq> <n>` followed by an n-byte
# JSON envelope {code | argv, files, env, stdin, timeout_ms, memory_mb, max_output_bytes,
# pids}. Frames to the worker on stdout: `done <seq> <n>` followed by an n-byte JSON report of
# what the supervisor observed: exit status, output (base64) with counts, time, limits hit.
#
# Each job runs in a child forked from this warm interpreter, in its own session and process
# group, under a user id of its own (no other job's, never root), with umask 077, in its own
# 0700 work directory, with pipes for stdin, stdout and stderr that only the supervisor holds.
# The job never sees the control channel: every other descriptor is closed before its code runs.
# At the end every process of its user id is killed and its files are removed.

def write_all(data):
    """Writes all of `data` to stdout: a write to a pipe may take only part of it."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


MEMORY_EXIT = 213  # the child's exit status when its code ran out of memory
FIRST_UID = 20000


def supervise():
    import base64
    import resource
    import selectors
    import shutil
    import signal
    import time

    # Every fork copies this interpreter; objects the collector never visits again are pages it
    # never touches again, so neither parent nor child pays to copy them (measured: about a
    # fifth more jobs per second).
    import gc

    gc.collect()
    gc.freeze()
    os.write(1, b'{"shardbox":"ready"}\n')
    sel = selectors.DefaultSelector()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel.register(wake_r, selectors.EVENT_READ, "signal")
    # The control channel is read by a thread of its own with plain blocking reads, and handed
    # on through a pipe inside the sandbox: after a restore, gVisor stops reporting readiness of
    # the host-backed stdin to epoll after the first few reads (seen with runsc 20221219).
    ctl_r, ctl_w = os.pipe()

    def pump_control():
        while True:
            chunk = os.read(0, 1 << 20)
            if not chunk:
                os.close(ctl_w)
                return
            os.write(ctl_w, chunk)

    import threading

    threading.Thread(target=pump_control, daemon=True).start()
    sel.register(ctl_r, selectors.EVENT_READ, "control")
    control = bytearray()
    jobs = {}  # pid -> job state
    by_fd = {}  # pipe fd -> job state
    free_uids = []
    next_uid = [FIRST_UID]

    def take_uid():
        if free_uids:
            return free_uids.pop()
        next_uid[0] += 1
        return next_uid[0]

    def processes_of(uid):
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                if os.stat("/proc/" + name).st_uid != uid:
                    continue
                with open("/proc/%s/stat" % name) as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
            except OSError:
                continue
            found.append(int(name))
        return found

    def kill_uid(uid, group=None):
        """Kills every process of `uid`: first its job's process group in one call (a fork
        bomb's children stay in it), then whatever a scan of /proc still finds, through a
        helper forked as that user that signals all it may (kill -1), until none is left."""
        if group is not None:
            try:
                os.killpg(group, signal.SIGKILL)
            except OSError:
                pass
        for _ in range(20):
            if not processes_of(uid):
                return
            helper = os.fork()
            if helper == 0:
                try:
                    os.setgid(uid)
                    os.setuid(uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(helper, 0)

    def start(seq, env):
        uid = take_uid()
        workdir = "/work/j%d" % seq
        os.mkdir(workdir, 0o700)
        os.chown(workdir, uid, uid)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 126
            try:
                child(env, uid, workdir, in_r, out_w, err_w)
            except SystemExit as done:
                if done.code is None:
                    code = 0
                elif isinstance(done.code, int):
                    code = done.code & 0xFF
                else:
                    sys.stderr.write("%s\n" % (done.code,))
                    code = 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except BaseException:
                        pass
                os._exit(code)
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        job = {
            "seq": seq, "pid": pid, "uid": uid, "workdir": workdir,
            "stdin": env.get("stdin", "").encode(), "in": in_w,
            "cap": int(env.get("max_output_bytes", 1 << 20)),
            "out": bytearray(), "err": bytearray(), "out_n": 0, "err_n": 0,
            "open": {out_r: "out", err_r: "err"}, "status": None, "rusage": None,
            "began": time.monotonic(),
            "deadline": time.monotonic() + int(env.get("timeout_ms", 30000)) / 1000.0,
            "timed_out": False,
            "pids": int(env.get("pids", 256)),
            "too_many": False,
        }
        jobs[pid] = job
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
            by_fd[fd] = job
        sel.register(out_r, selectors.EVENT_READ, "output")
        sel.register(err_r, selectors.EVENT_READ, "output")
        if job["stdin"]:
            sel.register(in_w, selectors.EVENT_WRITE, "input")
        else:
            os.close(in_w)
            del by_fd[in_w]

    def child(env, uid, workdir, in_r, out_w, err_w):
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        os.dup2(in_r, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        memory = int(env.get("memory_mb", 512)) << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        pids = int(env.get("pids", 256))
        resource.setrlimit(resource.RLIMIT_NPROC, (pids, pids))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        os.umask(0o077)
        os.environ["HOME"] = workdir
        os.environ["TMPDIR"] = workdir
        env["workdir"] = workdir
        prepare(env)
        reseed()
        import threading

        threading.stack_size(1 << 20)
        if "argv" in env:
            argv = env["argv"]
            try:
                os.execvp(argv[0], argv)
            except OSError as err:
                sys.stderr.write("shardbox: cannot execute %r: %s\n" % (argv[0], err))
                os._exit(127)
        run_python(env.get("code", ""), MEMORY_EXIT)

    def pump_input(fd):
        job = by_fd[fd]
        try:
            n = os.write(fd, job["stdin"][:65536])
            job["stdin"] = job["stdin"][n:]
        except BlockingIOError:
            return
        except OSError:
            job["stdin"] = b""
        if not job["stdin"]:
            close_input(job)

    def close_input(job):
        fd = job["in"]
        if fd in by_fd:
            try:
                sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            os.close(fd)
            del by_fd[fd]

    def pump_output(fd):
        job = by_fd[fd]
        which = job["open"][fd]
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            sel.unregister(fd)
            os.close(fd)
            del by_fd[fd]
            del job["open"][fd]
            maybe_finish(job)
            return
        job[which + "_n"] += len(chunk)
        room = job["cap"] - len(job[which])
        if room > 0:
            job[which] += chunk[:room]

    def reap():
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = jobs.get(pid)
            if job is None:
                continue
            job["status"], job["rusage"] = status, usage
            if job["open"]:
                # Descendants that still hold the job's pipes end with it.
                kill_uid(job["uid"], job["pid"])
            maybe_finish(job)

    def maybe_finish(job):
        if job["status"] is None or job["open"]:
            return
        close_input(job)
        kill_uid(job["uid"], job["pid"])
        shutil.rmtree(job["workdir"], ignore_errors=True)
        for name in os.listdir("/tmp"):
            path = "/tmp/" + name
            try:
                if os.lstat(path).st_uid == job["uid"]:
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)
            except OSError:
                pass
        del jobs[job["pid"]]
        free_uids.append(job["uid"])
        status = job["status"]
        usage = job["rusage"]
        report = {
            "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "timed_out": job["timed_out"],
            "too_many_processes": job["too_many"],
            "memory_exhausted": os.WIFEXITED(status) and os.WEXITSTATUS(status) == MEMORY_EXIT,
            "stdout": base64.b64encode(bytes(job["out"])).decode(),
            "stderr": base64.b64encode(bytes(job["err"])).decode(),
            "stdout_bytes": job["out_n"],
            "stderr_bytes": job["err_n"],
            "run_us": int((time.monotonic() - job["began"]) * 1e6),
            "cpu_us": int((usage.ru_utime + usage.ru_stime) * 1e6),
        }
        body = json.dumps(report).encode()
        write_all(b"done %d %d\n" % (job["seq"], len(body)) + body)

    def control_frames():
        while True:
            end = control.find(b"\n")
            if end < 0:
                return
            header = bytes(control[:end])
            if header == b"wake":
                del control[: end + 1]
                reseed()
                os.write(1, b'{"shardbox":"awake"}\n')
                continue
            parts = header.split()
            if len(parts) != 3 or parts[0] != b"job":
                os._exit(121)
            seq, n = int(parts[1]), int(parts[2])
            if len(control) < end + 1 + n:
                return
            body = bytes(control[end + 1 : end + 1 + n])
            del control[: end + 1 + n]
            try:
                start(seq, json.loads(body))
            except Exception as err:
                # A job that cannot even start is reported, never fatal to the supervisor.
                report = json.dumps({"error": "cannot start the job: %s" % err}).encode()
                write_all(b"done %d %d\n" % (seq, len(report)) + report)

    def count_by_uid():
        counts = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    uid = os.stat("/proc/" + name).st_uid
                except OSError:
                    continue
                counts[uid] = counts.get(uid, 0) + 1
        return counts

    # gVisor does not hold a user to RLIMIT_NPROC, so the supervisor counts each job's
    # processes itself, every WATCH seconds while jobs run, and ends a job that has too many.
    WATCH = 0.05
    watched = 0.0
    while True:
        now = time.monotonic()
        timeout = None
        if jobs and now - watched >= WATCH:
            watched = now
            counts = count_by_uid()
            for job in jobs.values():
                if job["status"] is None and counts.get(job["uid"], 0) > job["pids"]:
                    job["too_many"] = True
                    kill_uid(job["uid"], job["pid"])
        if jobs:
            timeout = WATCH
        for job in jobs.values():
            if job["status"] is None:
                if now >= job["deadline"] and not job["timed_out"]:
                    job["timed_out"] = True
                    kill_uid(job["uid"], job["pid"])
                left = max(0.0, job["deadline"] - now)
                timeout = left if timeout is None else min(timeout, left)
        events = sel.select(timeout if timeout is None else timeout + 0.001)
        for key, _ in events:
            if key.data == "control":
                chunk = os.read(ctl_r, 1 << 20)
                if not chunk:
                    os._exit(0)
                control.extend(chunk)
                control_frames()
            elif key.data == "signal":
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
            elif key.data == "input":
                pump_input(key.fd)
            else:
                pump_output(key.fd)
        reap()


main()
