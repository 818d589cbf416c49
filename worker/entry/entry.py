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

After a job frame the sandbox belongs to that job: its stdout, stderr and exit status are the
job's, observed by the worker outside the sandbox. Frames are read straight from file
descriptor 0, unbuffered, so no byte of the job's stdin is consumed here.
"""

import os
import sys

KIND = sys.argv[1] if len(sys.argv) > 1 else "python"


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
    import typing, unittest, uuid  # noqa
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


def run_python(code):
    import builtins

    sys.argv = ["<job>"]
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": "<job>"}
    try:
        exec(compile(code, "<job>", "exec"), namespace)
    except SystemExit:
        raise
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.exit(1)
    sys.exit(0)


def main():
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


main()
