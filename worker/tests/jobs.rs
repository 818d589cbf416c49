//! Real-runsc tests of the sandbox engine in sandbox isolation (one restored sandbox per job):
//! the shared scenarios of `common/scenarios.rs`, and what is particular to this level.

mod common;

const TEMPLATE: &str = "python";

include!("common/scenarios.rs");

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
fn timeouts_leave_no_host_zombies() {
    // Kind F2, second half: 500 jobs that time out leave no zombie on the host
    // (`SHARDBOX_F2_TIMEOUTS` sets another count).
    let count: usize = std::env::var("SHARDBOX_F2_TIMEOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let before = common::host_zombies();
    let jobs = (0..count)
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
        let shardbox_worker::Slot::Sandbox(inner) = &sandbox else {
            panic!("the python template isolates by sandbox");
        };
        let pid = inner.runsc_pid().expect("runsc runs");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The runsc process this test's worker started for this sandbox.
            kill_by_pid(pid);
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

fn kill_by_pid(pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status();
}
