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

In the default mode, after a job frame the sandbox belongs to that job: its stdout, stderr and
exit status are the job's, observed by the worker outside the sandbox. Frames are read straight
from file descriptor 0, unbuffered, so no byte of the job's stdin is consumed here.
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


def run_job(envelope, memory_exit=None):
    """Runs the envelope's `argv` in place of this process, or its Python `code`; never
    returns."""
    if "argv" in envelope:
        argv = envelope["argv"]
        try:
            os.execvp(argv[0], argv)
        except OSError as err:
            sys.stderr.write("shardbox: cannot execute %r: %s\n" % (argv[0], err))
            sys.exit(127)
    run_python(envelope.get("code", ""), memory_exit)


def main():
    if MODE == "process":
        supervise()
    envelope = next_job()
    prepare(envelope)
    run_job(envelope)


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
#
# The supervisor does not fork jobs itself. Before it serves, it forks a few zygotes: copies of
# the warm interpreter whose only work is to fork. For each job the supervisor sends a zygote a
# short message over a socket, `<seq> <uid> <cgroup>` with the job's three pipe ends attached;
# the zygote forks the job's process and, when it reaps it, answers `exit <seq> <status>
# <cpu_us>`; `kill <seq>` makes it kill that process while it is still its unreaped child.
# The job's process first reads its envelope from its own stdin (a 10-digit length, a newline,
# the JSON), then the rest of that stdin is the job's. Why zygotes: after a fork, every page
# that the parent or the child writes while both still share it is copied at a page fault, and
# faults are dear under gVisor. The supervisor's event loop writes many pages per job
# and now shares them with no child; a zygote's loop writes few.
#
# A job's processes are counted and ended through a pids cgroup of its own, in gVisor's own
# cgroup filesystem (the sandbox's kernel, not the host's), mounted by the supervisor under a
# directory only root may enter: the kernel refuses the job's forks past its `pids` limit, and
# the cgroup lists every process the job started, wherever it moved. gVisor does not enforce
# RLIMIT_NPROC, so where that mount fails the supervisor falls back to counting the processes of
# the job's user id in /proc and killing the job past its limit.

def write_all(data):
    """Writes all of `data` to stdout: a write to a pipe may take only part of it."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def read_small(path):
    """A small file's bytes in three system calls (Python's open() makes about eight, and
    every one is dear under gVisor's ptrace platform)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def close_fds_except(keep):
    """Closes every open descriptor of this process but those in `keep`."""
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:
                pass  # the listing's own descriptor, closed already


def write_small(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


MEMORY_EXIT = 213  # the child's exit status when its code ran out of memory
FIRST_UID = 20000
ENVELOPE_HEADER = 11  # b"%010d\n": the length of the envelope on the job's stdin
# World-writable directories of the sandbox, where a job may leave files for a later job of
# its user id to find.
SHARED_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")
PIDS_ROOT = "/tmp/.shardbox/pids"  # the pids cgroup hierarchy; /tmp/.shardbox is root's, 0700


def mount_pids_cgroup():
    """Mounts gVisor's pids cgroup controller at PIDS_ROOT; says whether it can be used."""
    import ctypes

    try:
        os.mkdir(os.path.dirname(PIDS_ROOT), 0o700)
        os.mkdir(PIDS_ROOT, 0o700)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"none", PIDS_ROOT.encode(), b"cgroup", 0, b"pids") != 0:
            err = ctypes.get_errno()
            sys.stderr.write("shardbox: no pids cgroup: %s\n" % os.strerror(err))
            return False
        return os.path.exists(PIDS_ROOT + "/cgroup.procs")
    except OSError as err:
        sys.stderr.write("shardbox: no pids cgroup: %s\n" % err)
        return False


def job_child(seq, uid, cgroup, pipes):
    """The job's process, just forked from a zygote: becomes the job and never returns. It
    joins `cgroup` (a path, or b"-" for none) while it is still root."""
    import resource
    import signal

    code = 126
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        for target, fd in enumerate(pipes):
            os.dup2(fd, target)
        close_fds_except((0, 1, 2))
        if cgroup != b"-":
            write_small(cgroup + b"/cgroup.procs", b"%d" % os.getpid())
        env = json.loads(read_exact(int(read_exact(ENVELOPE_HEADER))))
        memory = int(env.get("memory_mb", 512)) << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        pids = int(env.get("pids", 256))
        resource.setrlimit(resource.RLIMIT_NPROC, (pids, pids))
        workdir = "/work/j%d" % seq
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
        run_job(env, MEMORY_EXIT)
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


def zygote(sock):
    """A zygote's loop: fork a job for each job message, kill one on a kill message, reap them
    and report their ends. It never returns; it ends when the supervisor's end of `sock`
    closes. Only the zygote, the job's parent, kills by pid: until it reaps the job's process,
    that pid (and the process group the job leads) cannot be another process's."""
    import select
    import signal
    import socket

    # Nothing of the supervisor's but the socket and stderr: not the control channel.
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    close_fds_except((0, 1, 2, sock.fileno()))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    children = {}  # pid -> seq, until reaped
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
                continue
            msg, pipes, _, _ = socket.recv_fds(sock, 64, 3)
            if not msg:
                os._exit(0)
            words = msg.split()
            if words[0] == b"kill":
                for pid, seq in children.items():
                    if seq == words[1]:
                        for kill in (os.kill, os.killpg):
                            try:
                                kill(pid, signal.SIGKILL)
                            except OSError:
                                pass
                continue
            seq, uid, cgroup = words
            pid = os.fork()
            if pid == 0:
                job_child(int(seq), int(uid), cgroup, pipes)
            for fd in pipes:
                os.close(fd)
            children[pid] = seq
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            seq = children.pop(pid, None)
            if seq is not None:
                cpu_us = int((usage.ru_utime + usage.ru_stime) * 1e6)
                sock.send(b"exit %s %d %d" % (seq, status, cpu_us))


def supervise():
    import base64
    import gc
    import resource  # noqa: F401  imported once here, not by each job's child (a file search)
    import selectors
    import shutil
    import signal
    import socket
    import time

    # Objects the collector never visits again are pages it never writes again, so neither a
    # zygote nor its children pay to copy them (measured: about a fifth more jobs per second).
    # Jobs may enter /work to reach their own directories, but create nothing there.
    os.chmod("/work", 0o711)
    gc.collect()
    gc.freeze()
    zygotes = []
    for _ in range(max(1, min(4, os.cpu_count() or 1))):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            zygote(theirs)
        theirs.close()
        zygotes.append({"sock": ours, "pid": pid, "jobs": 0})
    os.write(1, b'{"shardbox":"ready"}\n')
    sel = selectors.DefaultSelector()
    for z in zygotes:
        sel.register(z["sock"], selectors.EVENT_READ, z)
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
    jobs = {}  # seq -> job state
    by_fd = {}  # pipe fd -> job state
    free_uids = []
    next_uid = [FIRST_UID]

    def take_uid():
        if free_uids:
            return free_uids.pop()
        next_uid[0] += 1
        return next_uid[0]

    pids_cgroup = []  # [whether the job cgroups work], once the first job starts
    stale = []  # ended jobs with processes still dying: their user ids are not reused yet

    def processes_of(job):
        """The job's live processes: its cgroup's members, or else its user's in /proc."""
        if job["cgroup"]:
            try:
                return [int(p) for p in read_small(job["cgroup"] + "/cgroup.procs").split()]
            except OSError:
                return []
        uid = job["uid"]
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

    def kill_job(job):
        """Kills every process of the job: its own process and process group, through its
        zygote while it runs (a fork bomb's children stay in the group); then, while its cgroup
        or a scan of /proc still finds any, all that its user may signal (kill -1), through a
        helper forked as that user. Says whether none is left."""
        if job["status"] is None:
            # Its end comes back from the zygote; the watch below kills again until it does.
            # What escaped its group is killed after its end (no helper fork under load here).
            job["zygote"]["sock"].send(b"kill %d" % job["seq"])
            return False
        for _ in range(20):
            if not processes_of(job):
                return True
            helper = os.fork()
            if helper == 0:
                try:
                    os.setgid(job["uid"])
                    os.setuid(job["uid"])
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(helper, 0)
        return not processes_of(job)

    def release(job):
        """Gives the job's user id back once none of its processes is left, and removes its
        cgroup; else keeps it for a later try."""
        if not kill_job(job):
            return False
        if job["cgroup"]:
            try:
                os.rmdir(job["cgroup"])
            except OSError:
                return False
        remove_files_of(job)
        free_uids.append(job["uid"])
        return True

    # The places outside its own directory where a job's user may create files (the sandbox's
    # world-writable directories; /work itself is root's, 0711), each with the modification
    # time it had when last listed and the user ids that owned entries then: unchanged since,
    # it holds nothing of a user not among those, and is not listed again for that user.
    shared_dirs = [[d, None, set()] for d in SHARED_DIRS]

    def remove_files_of(job):
        """Removes the job's directory and whatever its user left in the shared directories,
        once none of its processes is left to write more."""
        shutil.rmtree(job["workdir"], ignore_errors=True)
        for entry in shared_dirs:
            try:
                mtime = os.stat(entry[0]).st_mtime_ns
            except OSError:
                continue
            if mtime == entry[1] and job["uid"] not in entry[2]:
                continue
            # Taken before the listing: a change made while it runs makes the next look.
            entry[1] = mtime
            entry[2] = set()
            for name in os.listdir(entry[0]):
                path = entry[0] + "/" + name
                try:
                    owner = os.lstat(path).st_uid
                    if owner != job["uid"]:
                        entry[2].add(owner)
                        continue
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)
                except OSError:
                    pass
                if os.path.lexists(path):
                    entry[2].add(job["uid"])  # not removed: looked for again next time

    def start(seq, env):
        uid = take_uid()
        workdir = "/work/j%d" % seq
        os.mkdir(workdir, 0o700)
        os.chown(workdir, uid, uid)
        if not pids_cgroup:
            pids_cgroup.append(mount_pids_cgroup())
        cgroup = None
        if pids_cgroup[0]:
            cgroup = PIDS_ROOT + "/j%d" % seq
            os.mkdir(cgroup)
            write_small(cgroup + "/pids.max", b"%d" % int(env.get("pids", 256)))
        stdin = env.pop("stdin", "").encode()
        body = json.dumps(env).encode()
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        z = min(zygotes, key=lambda z: z["jobs"])
        try:
            message = b"%d %d %s" % (seq, uid, (cgroup or "-").encode())
            socket.send_fds(z["sock"], [message], [in_r, out_w, err_w])
        except OSError:
            os._exit(124)  # a zygote gone: as below, the sandbox cannot serve
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        z["jobs"] += 1
        job = {
            "seq": seq, "uid": uid, "workdir": workdir, "zygote": z,
            "cgroup": cgroup,
            "stdin": b"%010d\n" % len(body) + body + stdin, "in": in_w,
            "cap": int(env.get("max_output_bytes", 1 << 20)),
            "out": bytearray(), "err": bytearray(), "out_n": 0, "err_n": 0,
            "open": {out_r: "out", err_r: "err"}, "status": None, "cpu_us": 0,
            "began": time.monotonic(),
            "deadline": time.monotonic() + int(env.get("timeout_ms", 30000)) / 1000.0,
            "timed_out": False,
            "pids": int(env.get("pids", 256)),
            "too_many": False,
            "full_since": None,
        }
        jobs[seq] = job
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
            by_fd[fd] = job
        sel.register(out_r, selectors.EVENT_READ, ("output", job))
        sel.register(err_r, selectors.EVENT_READ, ("output", job))
        sel.register(in_w, selectors.EVENT_WRITE, ("input", job))

    def from_zygote(z):
        msg = z["sock"].recv(64)
        if not msg:
            # A zygote never ends while the supervisor lives; without it jobs cannot start.
            os._exit(124)
        _, seq, status, cpu_us = msg.split()
        job = jobs.get(int(seq))
        if job is None:
            return
        z["jobs"] -= 1
        job["status"], job["cpu_us"] = int(status), int(cpu_us)
        if job["open"]:
            # Descendants that still hold the job's pipes end with it.
            kill_job(job)
        maybe_finish(job)

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
        # By identity: once closed, the number may already be another job's pipe.
        if by_fd.get(fd) is job:
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

    def maybe_finish(job):
        if job["status"] is None or job["open"]:
            return
        close_input(job)
        if not release(job):
            stale.append(job)
        del jobs[job["seq"]]
        status = job["status"]
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
            "cpu_us": job["cpu_us"],
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

    # Every WATCH seconds while jobs run, or ended jobs' processes are still dying: a job past
    # its deadline, or past its process limit, is killed again at each check until its zygote
    # reports its end, since at the first its process may not have been forked yet; an ended
    # job's leftovers are killed again until none is left, and only then is its user id given
    # to another job. Past its process limit means, with job cgroups, held at the limit for
    # FULL seconds (a fork bomb: under the ptrace platform each fork the kernel refuses still
    # costs the host, and host threads pile up while it goes on), and without them, more
    # processes of its user in /proc than the limit.
    # A job younger than YOUNG seconds is not yet looked at: most jobs end before, and a fork
    # bomb is only killed after FULL seconds at its limit anyway.
    WATCH = 0.05
    FULL = 0.5
    YOUNG = 0.25

    def at_limit(job):
        try:
            return int(read_small(job["cgroup"] + "/pids.current")) >= job["pids"]
        except (OSError, ValueError):
            return False
    watched = 0.0
    while True:
        now = time.monotonic()
        timeout = None
        if (jobs or stale) and now - watched >= WATCH:
            watched = now
            stale[:] = [job for job in stale if not release(job)]
            counting = jobs and not pids_cgroup[0]
            counts = count_by_uid() if counting else {}
            for job in jobs.values():
                if job["status"] is not None:
                    continue
                if job["cgroup"]:
                    if now - job["began"] < YOUNG:
                        pass
                    elif not at_limit(job):
                        job["full_since"] = None
                    elif job["full_since"] is None:
                        job["full_since"] = now
                    elif now - job["full_since"] >= FULL:
                        job["too_many"] = True
                elif counts.get(job["uid"], 0) > job["pids"]:
                    job["too_many"] = True
                if now >= job["deadline"]:
                    job["timed_out"] = True
                if job["too_many"] or job["timed_out"]:
                    kill_job(job)
        if jobs or stale:
            timeout = WATCH
        for job in jobs.values():
            if job["status"] is None and not job["timed_out"]:
                if now >= job["deadline"]:
                    job["timed_out"] = True
                    kill_job(job)
                timeout = min(timeout, max(0.0, job["deadline"] - now))
        events = sel.select(timeout if timeout is None else timeout + 0.001)
        for key, _ in events:
            if key.data == "control":
                chunk = os.read(ctl_r, 1 << 20)
                if not chunk:
                    os._exit(0)
                control.extend(chunk)
                control_frames()
            elif isinstance(key.data, tuple):
                # An event may name a pipe that an earlier event of the same
                # batch closed, or whose number a new job has since reused.
                kind, job = key.data
                if by_fd.get(key.fd) is not job:
                    continue
                if kind == "input":
                    pump_input(key.fd)
                else:
                    pump_output(key.fd)
            else:
                from_zygote(key.data)


main()
