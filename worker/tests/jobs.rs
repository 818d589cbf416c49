//! Real-runsc tests of the sandbox engine: ordinary jobs, every status, and hostile jobs, each
//! followed by a check that the worker still serves and that nothing of the sandbox is left.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{assert_gone, assert_serves, assert_within_deadline, py, py_limited, run, Harness};
use shardbox_proto::{Job, Status};

fn h() -> &'static Harness {
    common::shared(common::worker_config)
}

const GONE: Duration = Duration::from_secs(5);

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
    assert_gone(&ran.sandbox_id, GONE);
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
    assert_eq!(
        r.stdout,
        "'line one\\nline two\\n'\nfile text é\n/work hi\n"
    );
    assert_eq!(r.labels["problem"]["n"], 1);
}

#[test]
fn exec_template_runs_argv_with_stdin() {
    let job = Job {
        id: "exec".into(),
        template: Some("exec".into()),
        argv: Some(vec![
            "sh".into(),
            "-c".into(),
            "cat run.sh; wc -c; exit 3".into(),
        ]),
        stdin: "12345".into(),
        files: BTreeMap::from([("run.sh".into(), "echo hi\n".into())]),
        ..Job::default()
    };
    let r = run(h(), job).result;
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.stdout, "echo hi\n5\n");
    let missing = Job {
        id: "exec-missing".into(),
        template: Some("exec".into()),
        argv: Some(vec!["/no/such/program".into()]),
        ..Job::default()
    };
    let r = run(h(), missing).result;
    assert_eq!(r.status, Status::Failed, "{r:?}");
    assert_eq!(r.exit_code, Some(127));
    assert!(r.stderr.contains("cannot execute"), "{r:?}");
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
fn invalid_jobs_are_refused_before_running() {
    let worker = &h().worker;
    let cases = [
        (
            Job {
                template: Some("nope".into()),
                ..py("t", "")
            },
            "unknown template",
        ),
        (
            Job {
                argv: Some(vec!["ls".into()]),
                ..py("a", "")
            },
            "give code, not argv",
        ),
        (py_limited("l", "", 10_000_000), "above template"),
        (
            Job {
                memory_mb: Some(1 << 20),
                ..py("m", "")
            },
            "memory_mb",
        ),
        (
            Job {
                id: "e".into(),
                template: Some("exec".into()),
                ..Job::default()
            },
            "give argv",
        ),
    ];
    for (job, want) in cases {
        let err = worker.prepare(job).unwrap_err();
        assert!(err.contains(want), "{err} should mention {want}");
    }
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
    assert_gone(&ran.sandbox_id, GONE);
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
    assert_gone(&ran.sandbox_id, GONE);
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
    assert_gone(&ran.sandbox_id, GONE);
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
    assert_within_deadline(&ran, 3000);
    assert_gone(&ran.sandbox_id, GONE);
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
        assert_gone(&ran.sandbox_id, GONE);
        assert_serves(h());
    }
}

#[test]
fn meminfo_reports_the_template_memory_limit() {
    // Kind F4: gVisor reports the sandbox's cgroup limit as MemTotal, which is the template's
    // limit (512 MiB in the embedded config); a job asking for less is held to its own limit by
    // the host cgroup (documented in the README).
    let code = "for line in open('/proc/meminfo'):\n\
                \x20   if line.startswith('MemTotal'): print(int(line.split()[1]) // 1024)\n";
    let job = Job {
        memory_mb: Some(256),
        ..py("meminfo", code)
    };
    let r = run(h(), job).result;
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let mib: u64 = r.stdout.trim().parse().unwrap();
    assert_eq!(mib, 512, "{r:?}");
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
    assert_gone(&ran.sandbox_id, GONE);
}

#[test]
fn timeouts_leave_no_host_zombies() {
    // Kind F2, second half: many jobs that time out leave no zombie on the host.
    let before = common::host_zombies();
    let jobs = (0..40)
        .map(|i| py_limited(&format!("z{i}"), "import time; time.sleep(60)", 300))
        .collect();
    for ran in common::run_all(h(), jobs) {
        assert_eq!(ran.result.status, Status::Timeout, "{:?}", ran.result);
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = common::host_zombies();
    assert!(
        after <= before,
        "host zombies went from {before} to {after}"
    );
}

#[test]
fn a_dead_runsc_is_a_sandbox_error() {
    // runsc itself dies mid-job (killed from outside): a fault of the system, not of the job.
    let h = h();
    let worker = std::sync::Arc::clone(&h.worker);
    let r = h.rt.block_on(async move {
        let prepared = worker
            .prepare(py("dead", "import time; time.sleep(30)"))
            .unwrap();
        let sandbox = worker.acquire(&prepared.template).await.unwrap();
        let pid = sandbox.runsc_pid().expect("runsc runs");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The runsc process this test's worker started for this sandbox.
            unsafe_free_kill(pid);
        });
        worker
            .run(sandbox, &prepared, std::time::Instant::now())
            .await
    });
    assert_eq!(r.status, Status::SandboxError, "{r:?}");
    assert!(
        r.error.as_deref().unwrap_or_default().contains("runsc"),
        "{r:?}"
    );
    assert_serves(h);
}

fn unsafe_free_kill(pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status();
}
