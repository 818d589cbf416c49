// The job scenarios run by both isolation levels: `jobs.rs` (a sandbox per job) and
// `process.rs` (a process per job), each of which defines `TEMPLATE` and includes this file.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{assert_within_deadline, Harness, Ran};
use shardbox_proto::{Job, Status};

fn h() -> &'static Harness {
    common::shared(common::worker_config)
}

const GONE: Duration = Duration::from_secs(5);

/// Runs one job in a trust domain named after the running test, so that in process isolation
/// every test has sandboxes of its own and its checks see only its own jobs.
fn run(h: &Harness, job: Job) -> Ran {
    let domain = std::thread::current().name().unwrap_or("main").to_owned();
    common::run_all_in(h, vec![job], &domain).pop().expect("one result")
}

/// Asserts that the worker still serves a trivial job promptly.
fn assert_serves(h: &Harness) {
    let ran = run(h, py("after", "print('still here')"));
    assert_eq!(ran.result.status, Status::Ok, "{:?}", ran.result);
    assert_eq!(ran.result.stdout, "still here\n");
}

/// A Python job of this file's template.
fn py(id: &str, code: &str) -> Job {
    Job { template: Some(TEMPLATE.into()), ..common::py(id, code) }
}

/// A Python job of this file's template with a wall-time limit.
fn py_limited(id: &str, code: &str, timeout_ms: u64) -> Job {
    Job { timeout_ms: Some(timeout_ms), ..py(id, code) }
}

/// Asserts that nothing of the job is left: in sandbox isolation no host process or cgroup of
/// its sandbox; in process isolation no process of another user than root inside the sandbox,
/// as seen by the next job of the same domain.
fn assert_cleaned(ran: &Ran) {
    if TEMPLATE == "python" {
        common::assert_gone(&ran.sandbox_id, GONE);
        return;
    }
    let probe = "import os\n\
                 me, left = os.getuid(), 0\n\
                 for p in os.listdir('/proc'):\n\
                 \x20   try: left += p.isdigit() and os.stat('/proc/' + p).st_uid not in (0, me)\n\
                 \x20   except OSError: pass\n\
                 print(left)\n";
    let until = std::time::Instant::now() + GONE;
    loop {
        let r = run(h(), py("probe", probe)).result;
        assert_eq!(r.status, Status::Ok, "{r:?}");
        if r.stdout == "0\n" {
            return;
        }
        assert!(std::time::Instant::now() < until, "processes left behind: {}", r.stdout);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn plain_job_prints() {
    let ran = run(h(), py("plain", "print('hello', 6 * 7)"));
    let r = &ran.result;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout, "hello 42\n");
    assert_eq!(r.stderr, "");
    assert_eq!(r.stdout_bytes, 9);
    assert!(!r.worker.is_empty());
    assert_cleaned(&ran);
}

#[test]
fn stdin_files_env_and_labels_reach_the_job() {
    let mut job = py(
        "io",
        "import os, sys\n\
         data = sys.stdin.read()\n\
         print(repr(data))\n\
         print(open('sub/dir/in.txt').read())\n\
         print(os.getcwd(), os.environ['GREETING'])\n",
    );
    job.stdin = "line one\nline two\n".into();
    job.files = BTreeMap::from([("sub/dir/in.txt".into(), "file text é".into())]);
    job.env = BTreeMap::from([("GREETING".into(), "hi".into())]);
    job.labels
        .insert("problem".into(), serde_json::json!({"n": 1}));
    let r = run(h(), job).result;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    // In process isolation each job has a directory of its own under /work.
    let want = "'line one\\nline two\\n'\nfile text é\n/work";
    assert!(r.stdout.starts_with(want) && r.stdout.ends_with(" hi\n"), "{r:?}");
    assert_eq!(r.labels["problem"]["n"], 1);
}

#[test]
fn failures_exceptions_and_signals() {
    let r = run(h(), py("exit", "import sys; print('x'); sys.exit(7)")).result;
    assert_eq!(
        (r.status, r.exit_code, r.signal),
        (Status::Failed, Some(7), None),
        "{r:?}"
    );
    let r = run(h(), py("raise", "raise ValueError('boom')")).result;
    assert_eq!((r.status, r.exit_code), (Status::Failed, Some(1)), "{r:?}");
    assert!(r.stderr.contains("ValueError: boom"), "{r:?}");
    let r = run(h(), py("syntax", "def f(:\n")).result;
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert!(r.stderr.contains("SyntaxError"), "{r:?}");
    let r = run(
        h(),
        py(
            "kill",
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        ),
    )
    .result;
    assert_eq!(
        (r.status, r.signal, r.exit_code),
        (Status::Failed, Some(9), None),
        "{r:?}"
    );
}

#[test]
fn timeout_kills_a_loop_that_ignores_signals() {
    let code = "import signal\n\
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n\
                \x20   signal.signal(s, signal.SIG_IGN)\n\
                print('spinning', flush=True)\n\
                while True: pass\n";
    let ran = run(h(), py_limited("spin", code, 1500));
    assert_eq!(ran.result.status, Status::Timeout, "{:?}", ran.result);
    assert_eq!(ran.result.stdout, "spinning\n");
    // It spun: the sandbox reports CPU time (how much depends on the machine's load).
    assert!(ran.result.timing.cpu_ms > 20, "{:?}", ran.result.timing);
    assert_within_deadline(&ran, 1500);
    assert_cleaned(&ran);
    assert_serves(h());
}

#[test]
fn detached_descendants_die_with_the_sandbox() {
    // Kind F1: a detached shell loop in its own session, then a long sleep.
    let code = "import subprocess, time\n\
                subprocess.Popen(['sh', '-c', 'while true; do sleep 1; done'],\n\
                \x20                start_new_session=True)\n\
                time.sleep(3600)\n";
    let ran = run(h(), py_limited("f1", code, 2000));
    assert_eq!(ran.result.status, Status::Timeout, "{:?}", ran.result);
    assert_within_deadline(&ran, 2000);
    assert_cleaned(&ran);
    assert_serves(h());
}

#[test]
fn a_grandchild_holding_stdout_does_not_hold_the_job() {
    // The job exits at once; a grandchild keeps stdout open and writes for a minute.
    let code = "import subprocess\n\
                subprocess.Popen(['sh', '-c', 'while true; do echo tick; sleep 0.2; done'],\n\
                \x20                start_new_session=True)\n\
                print('parent done', flush=True)\n";
    let ran = run(h(), py_limited("holder", code, 5000));
    assert_eq!(ran.result.status, Status::Ok, "{:?}", ran.result);
    assert!(
        ran.result.stdout.starts_with("parent done\n"),
        "{:?}",
        ran.result
    );
    assert!(ran.wall < Duration::from_secs(5), "took {:?}", ran.wall);
    assert_cleaned(&ran);
}

#[test]
fn a_job_that_closes_its_descriptors_still_gets_a_result() {
    let code = "import os, time\n\
                print('before', flush=True)\n\
                for fd in range(0, 1024):\n\
                \x20   try: os.close(fd)\n\
                \x20   except OSError: pass\n\
                time.sleep(0.5)\n\
                os._exit(4)\n";
    let ran = run(h(), py_limited("closer", code, 5000));
    assert_eq!(ran.result.status, Status::Failed, "{:?}", ran.result);
    assert_eq!(ran.result.exit_code, Some(4));
    assert_eq!(ran.result.stdout, "before\n");
    assert_serves(h());
}

#[test]
fn fork_bomb_ends_by_its_deadline() {
    let code = "import os\n\
                while True:\n\
                \x20   try: os.fork()\n\
                \x20   except OSError: pass\n";
    let ran = run(h(), py_limited("forkbomb", code, 3000));
    assert!(
        matches!(
            ran.result.status,
            Status::Timeout | Status::MemoryLimit | Status::Failed
        ),
        "{:?}",
        ran.result
    );
    // Sandbox isolation: the host's pids cgroup refuses the forks; process isolation: the job's
    // pids cgroup inside gVisor does. Either way the bomb runs to its deadline, no further.
    assert_within_deadline(&ran, 3000);
    // A bomb that ends before its deadline says which limit ended it.
    if ran.result.status == Status::Failed {
        let error = ran.result.error.as_deref().unwrap_or_default();
        assert!(error.contains("limit of"), "{:?}", ran.result);
    }
    assert_cleaned(&ran);
    assert_serves(h());
}

#[test]
fn memory_hogs_get_memory_limit() {
    // Kind F3: a 200 MB read from /dev/zero under a 128 MB limit, and one 1 GiB string, each
    // against a few limits.
    let cases = [
        (
            "zero",
            "data = open('/dev/zero', 'rb').read(200 * 1024 * 1024)\nprint(len(data))",
            128,
        ),
        ("string", "s = 'x' * (1 << 30)\nprint(len(s))", 128),
        ("string256", "s = 'x' * (1 << 30)\nprint(len(s))", 256),
        (
            "list",
            "a = []\nwhile True: a.append(bytearray(1 << 20))",
            200,
        ),
    ];
    for (id, code, mb) in cases {
        let job = Job {
            memory_mb: Some(mb),
            ..py_limited(id, code, 20_000)
        };
        let ran = run(h(), job);
        assert_eq!(
            ran.result.status,
            Status::MemoryLimit,
            "{id}: {:?}",
            ran.result
        );
        assert_cleaned(&ran);
        assert_serves(h());
    }
}

#[test]
fn threads_under_a_memory_limit_work() {
    // Kind F5: 64 threads of a threaded standard library under a 512 MB limit.
    let code = "import threading, queue, concurrent.futures as cf\n\
                with cf.ThreadPoolExecutor(64) as pool:\n\
                \x20   total = sum(pool.map(lambda i: sum(range(i * 1000)), range(64)))\n\
                print(threading.active_count(), total > 0)\n";
    let job = Job {
        memory_mb: Some(512),
        ..py_limited("threads", code, 20_000)
    };
    let r = run(h(), job).result;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.stdout, "1 True\n");
}

#[test]
fn huge_output_is_capped_and_counted() {
    // 200 MB on stdout, a little on stderr; the cap keeps the first MiB.
    let code = "import sys\n\
                chunk = 'y' * 1023 + '\\n'\n\
                for _ in range(200 * 1024): sys.stdout.write(chunk)\n\
                sys.stderr.write('done\\n')\n";
    let job = Job {
        max_output_bytes: Some(1 << 20),
        ..py_limited("flood", code, 60_000)
    };
    let ran = run(h(), job);
    let r = &ran.result;
    assert_eq!(
        r.status,
        Status::OutputLimit,
        "{:?}",
        (r.status, &r.error, r.stdout_bytes)
    );
    assert!(r.stdout_truncated && !r.stderr_truncated);
    assert_eq!(r.stdout.len(), 1 << 20);
    assert_eq!(r.stdout_bytes, 200 * 1024 * 1024);
    assert_eq!(r.stderr, "done\n");
    assert_serves(h());
}

#[test]
fn non_utf8_output_is_replaced_not_an_error() {
    let code = "import sys\n\
                sys.stdout.buffer.write(b'ok \\xff\\xfe end\\n')\n\
                sys.stderr.buffer.write(b'\\xc3\\x28')\n";
    let r = run(h(), py("bytes", code)).result;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.stdout, "ok \u{fffd}\u{fffd} end\n");
    assert_eq!(r.stderr, "\u{fffd}(");
    assert_eq!((r.stdout_bytes, r.stderr_bytes), (10, 2));
}

#[test]
fn clones_of_one_checkpoint_get_fresh_randomness() {
    let code = "import random, uuid, os\nprint(random.random(), uuid.uuid4(), os.urandom(8).hex())";
    let jobs = (0..16).map(|i| py(&format!("rand{i}"), code)).collect();
    let ran = common::run_all(h(), jobs);
    let mut randoms = BTreeSet::new();
    let mut uuids = BTreeSet::new();
    for r in &ran {
        assert_eq!(r.result.status, Status::Ok, "{:?}", r.result);
        let parts: Vec<&str> = r.result.stdout.split_whitespace().collect();
        randoms.insert(parts[0].to_owned());
        uuids.insert(parts[1].to_owned());
    }
    assert_eq!(randoms.len(), 16, "{randoms:?}");
    assert_eq!(uuids.len(), 16, "{uuids:?}");
}

#[test]
fn orphans_and_zombies_are_reaped_inside_the_sandbox() {
    // Kind F2: 600 children each leave an orphaned grandchild; then a subprocess still works
    // and no zombie is left inside the sandbox.
    let code = "import os, subprocess\n\
                for _ in range(600):\n\
                \x20   pid = os.fork()\n\
                \x20   if pid == 0:\n\
                \x20       if os.fork() == 0: os._exit(0)\n\
                \x20       os._exit(0)\n\
                \x20   os.waitpid(pid, 0)\n\
                subprocess.run(['true'], check=True)\n\
                import time; time.sleep(0.5)\n\
                zombies = 0\n\
                for p in os.listdir('/proc'):\n\
                \x20   if p.isdigit():\n\
                \x20       try: state = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0]\n\
                \x20       except OSError: continue\n\
                \x20       zombies += state == 'Z'\n\
                print(zombies)\n";
    // Forks cost tens of milliseconds each under gVisor's ptrace platform.
    let ran = run(h(), py_limited("f2", code, 110_000));
    assert_eq!(ran.result.status, Status::Ok, "{:?}", ran.result);
    assert_eq!(ran.result.stdout, "0\n");
    assert_cleaned(&ran);
}
