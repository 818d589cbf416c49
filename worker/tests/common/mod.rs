//! Shared harness of the worker's real-runsc tests: one worker per test binary, on a runtime
//! that outlives each test, with its own state directory.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use shardbox_proto::{Job, JobResult};
use shardbox_worker::{Worker, WorkerConfig};

/// The runtime and worker shared by the tests of one binary.
pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub worker: Arc<Worker>,
}

/// Test config: the embedded templates with small pools, state under /var/tmp.
pub fn test_config(name: &str) -> WorkerConfig {
    let text = shardbox_worker::config::EMBEDDED_CONFIG.replace(
        "state_dir = \"/var/lib/shardbox\"",
        &format!("state_dir = \"/var/tmp/shardbox-test-{name}\""),
    );
    WorkerConfig::parse(&text, "test").expect("test config")
}

pub fn harness(name: &'static str) -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let config = test_config(name);
        let worker = rt.block_on(Worker::start(&config)).expect("worker starts");
        Harness {
            rt,
            worker: Arc::new(worker),
        }
    })
}

/// Runs one job through the shared worker.
pub fn run(h: &Harness, job: Job) -> JobResult {
    let worker = Arc::clone(&h.worker);
    h.rt.block_on(async move {
        let prepared = worker.prepare(job).expect("job is valid");
        let sandbox = worker.acquire(&prepared.template).await.expect("a sandbox");
        worker.run(sandbox, &prepared, Instant::now()).await
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
