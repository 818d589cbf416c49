//! Shared harness of the worker's real-runsc tests: one worker per test binary, on a runtime
//! that outlives each test, with its own state directory under /var/tmp.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use shardbox_proto::{Job, JobResult, Status};
use shardbox_worker::{Worker, WorkerConfig};

/// The runtime and worker shared by the tests of one binary.
pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub worker: Arc<Worker>,
}

/// The embedded configuration with its state directory moved to `/var/tmp/shardbox-test-NAME`
/// and `edit` applied to the text.
pub fn test_config(name: &str, edit: impl Fn(String) -> String) -> WorkerConfig {
    let text = shardbox_worker::config::EMBEDDED_CONFIG.replace(
        "state_dir = \"/var/lib/shardbox\"",
        &format!("state_dir = \"/var/tmp/shardbox-test-{name}\""),
    );
    WorkerConfig::parse(&edit(text), "test").expect("test config")
}

/// The configuration shared by the worker's test binaries: one state directory (cargo runs test
/// binaries one after another, and each worker removes what the previous one left), so the
/// template images are built once for all of them.
pub fn worker_config() -> WorkerConfig {
    test_config("worker", |text| {
        // Room for the output-flood and fork tests; other jobs set their own limits.
        text.replace("timeout_ms = 30000", "timeout_ms = 120000")
            .replace("min_idle = 2, max_idle = 4", "min_idle = 2, max_idle = 6")
            .replace("max_output_bytes = 1048576", "max_output_bytes = 8388608")
    })
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHARDBOX_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Starts a worker for `config` on a runtime of its own.
pub fn start(config: WorkerConfig) -> Harness {
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let worker = rt.block_on(Worker::start(&config)).expect("worker starts");
    Harness {
        rt,
        worker: Arc::new(worker),
    }
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

/// The worker shared by this test binary, started on first use with `config`; its sandboxes
/// are destroyed when the test process exits.
pub fn shared(config: impl FnOnce() -> WorkerConfig) -> &'static Harness {
    HARNESS.get_or_init(|| {
        let h = start(config());
        // SAFETY: `shutdown_at_exit` is a plain `extern "C" fn()` with no arguments, as atexit
        // requires; it only reads the initialized static.
        unsafe { libc::atexit(shutdown_at_exit) };
        h
    })
}

extern "C" fn shutdown_at_exit() {
    if let Some(h) = HARNESS.get() {
        let worker = Arc::clone(&h.worker);
        h.rt.block_on(async move { worker.shutdown().await });
    }
}

/// What the tests see of one job.
pub struct Ran {
    pub result: JobResult,
    pub sandbox_id: String,
    pub wall: Duration,
}

/// Runs one job through the worker.
pub fn run(h: &Harness, job: Job) -> Ran {
    run_all(h, vec![job]).pop().expect("one result")
}

/// Runs many jobs at once.
pub fn run_all(h: &Harness, jobs: Vec<Job>) -> Vec<Ran> {
    run_all_in(h, jobs, shardbox_worker::DEFAULT_DOMAIN)
}

/// Runs many jobs at once in trust domain `domain`.
pub fn run_all_in(h: &Harness, jobs: Vec<Job>, domain: &str) -> Vec<Ran> {
    let worker = Arc::clone(&h.worker);
    let domain = domain.to_owned();
    h.rt.block_on(async move {
        let tasks: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                let worker = Arc::clone(&worker);
                let domain = domain.clone();
                tokio::spawn(async move {
                    let prepared = worker.prepare(job).expect("job is valid");
                    let sandbox = worker
                        .acquire_in(&prepared.template, &domain)
                        .await
                        .expect("a sandbox");
                    let sandbox_id = sandbox.sandbox_id().to_owned();
                    let taken = Instant::now();
                    let result = worker.run(sandbox, &prepared, taken).await;
                    Ran {
                        result,
                        sandbox_id,
                        wall: taken.elapsed(),
                    }
                })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.expect("task"));
        }
        out
    })
}

/// A Python job.
pub fn py(id: &str, code: &str) -> Job {
    Job {
        id: id.into(),
        code: Some(code.into()),
        ..Job::default()
    }
}

/// A Python job with a wall-time limit.
pub fn py_limited(id: &str, code: &str, timeout_ms: u64) -> Job {
    Job {
        timeout_ms: Some(timeout_ms),
        ..py(id, code)
    }
}

/// Host processes whose command line names `sandbox_id` (runsc's own and gVisor's carry it).
pub fn host_processes_of(sandbox_id: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(sandbox_id) {
            found.push(pid);
        }
    }
    found
}

/// Asserts that, within `patience`, no host process and no cgroup of the sandbox is left.
pub fn assert_gone(sandbox_id: &str, patience: Duration) {
    let until = Instant::now() + patience;
    loop {
        let procs = host_processes_of(sandbox_id);
        let cgroups: Vec<_> = ["memory", "pids", "cpuacct"]
            .iter()
            .flat_map(|c| glob_cgroup(c, sandbox_id))
            .collect();
        if procs.is_empty() && cgroups.is_empty() {
            return;
        }
        assert!(
            Instant::now() < until,
            "sandbox {sandbox_id} left processes {procs:?} and cgroups {cgroups:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn glob_cgroup(controller: &str, sandbox_id: &str) -> Vec<std::path::PathBuf> {
    let base = std::path::Path::new("/sys/fs/cgroup")
        .join(controller)
        .join("shardbox");
    let mut found = Vec::new();
    for worker in std::fs::read_dir(base).into_iter().flatten().flatten() {
        let path = worker.path().join(sandbox_id);
        if path.exists() {
            found.push(path);
        }
    }
    found
}

/// Asserts that the worker still serves a trivial job promptly.
pub fn assert_serves(h: &Harness) {
    let ran = run(h, py("after", "print('still here')"));
    assert_eq!(ran.result.status, Status::Ok, "{:?}", ran.result);
    assert_eq!(ran.result.stdout, "still here\n");
}

/// Asserts the deadline rule: a job with limit `limit_ms` ended within 1.5 times it plus 0.5 s.
pub fn assert_within_deadline(ran: &Ran, limit_ms: u64) {
    let bound = Duration::from_millis(limit_ms * 3 / 2 + 500);
    assert!(
        ran.wall <= bound,
        "job took {:?}, more than {bound:?}",
        ran.wall
    );
}

/// Zombie processes on the host.
pub fn host_zombies() -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().parse::<i32>().is_err() {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) {
            if stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            {
                n += 1;
            }
        }
    }
    n
}
