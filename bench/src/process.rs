//! The `process` suite: trivial Python jobs per second in process isolation, against sandbox
//! isolation, against an unsandboxed `python3 -c` subprocess per job, and against the ceiling
//! of process isolation on this machine: a bare loop inside one sandbox that forks a child, runs
//! the same code and reaps it, with nothing else, at the same concurrency as the process
//! template's slots.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shardbox_proto::{Job, Status};
use shardbox_worker::{Worker, WorkerConfig};

use crate::report::{
    host_python, only_templates, ratio, remove_bare_cgroup_parent, table, warm_pool,
    BARE_CGROUP_PARENT,
};

/// Options of the suite.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// The process-isolation template.
    #[arg(long, default_value = "python-process")]
    pub process_template: String,
    /// The sandbox-isolation template.
    #[arg(long, default_value = "python")]
    pub sandbox_template: String,
    /// Jobs through process isolation (and through the bare loop).
    #[arg(long, default_value_t = 400)]
    pub jobs: usize,
    /// Jobs through sandbox isolation and through host subprocesses.
    #[arg(long, default_value_t = 40)]
    pub baseline_jobs: usize,
}

const CODE: &str = "print(sum(range(1000)))";

/// Runs `n` jobs of `template` all at once; returns jobs per second.
async fn through_worker(worker: &Arc<Worker>, template: &str, n: usize) -> anyhow::Result<f64> {
    let began = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let worker = Arc::clone(worker);
        let template = template.to_owned();
        tasks.push(tokio::spawn(async move {
            let job = Job {
                id: format!("{template}-{i}"),
                template: Some(template),
                code: Some(CODE.into()),
                ..Job::default()
            };
            let prepared = worker.prepare(job).map_err(anyhow::Error::msg)?;
            let slot = worker.acquire(&prepared.template).await?;
            let result = worker.run(slot, &prepared, Instant::now()).await;
            anyhow::ensure!(
                result.status == Status::Ok && result.stdout == "499500\n",
                "job failed: {result:?}"
            );
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(n as f64 / began.elapsed().as_secs_f64())
}

/// Runs `n` jobs as host `python3 -c` subprocesses (the interpreter of `rootfs`, see
/// [`host_python`]), `lanes` at a time; returns jobs per second.
async fn host_subprocesses(rootfs: &Path, n: usize, lanes: usize) -> anyhow::Result<f64> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let began = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..lanes {
        let next = Arc::clone(&next);
        let rootfs = rootfs.to_owned();
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let out = host_python(&rootfs, CODE).output().await?;
                anyhow::ensure!(out.status.success() && out.stdout == b"499500\n", "{out:?}");
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(n as f64 / began.elapsed().as_secs_f64())
}

/// The ceiling: one sandbox of the process template's rootfs runs `lanes` loops that fork a
/// child per job, run the code with its output on a pipe, read it and reap the child.
async fn bare_fork_loop(
    worker: &Worker,
    template: &str,
    n: usize,
    lanes: usize,
) -> anyhow::Result<f64> {
    let pool = &worker.pools()[template];
    let mut bundle = pool.template().bundle().clone();
    // The loop's interpreter has imported what the python template's warm-up imports (the same
    // lines, read from the entry script) and frozen its heap for the collector, as the
    // supervisor's has: forks copy that state.
    let warm_up: String = shardbox_worker::template::ENTRY_SCRIPT
        .lines()
        .filter(|l| l.starts_with("    import ") && l.ends_with("# noqa"))
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    let program = format!(
        "import os, time, json, random, gc\n{warm_up}gc.collect()\ngc.freeze()\n\
         code = compile({CODE:?}, '<job>', 'exec')\n\
         def loop(count):\n\
         \x20   for _ in range(count):\n\
         \x20       r, w = os.pipe()\n\
         \x20       pid = os.fork()\n\
         \x20       if pid == 0:\n\
         \x20           os.close(r); os.dup2(w, 1)\n\
         \x20           exec(code, {{'__name__': '__main__'}})\n\
         \x20           import sys; sys.stdout.flush(); os._exit(0)\n\
         \x20       os.close(w)\n\
         \x20       while os.read(r, 65536): pass\n\
         \x20       os.close(r); os.waitpid(pid, 0)\n\
         began = time.monotonic()\n\
         kids = []\n\
         for lane in range({lanes}):\n\
         \x20   pid = os.fork()\n\
         \x20   if pid == 0:\n\
         \x20       loop({n} // {lanes}); os._exit(0)\n\
         \x20   kids.append(pid)\n\
         for pid in kids: os.waitpid(pid, 0)\n\
         print({n} // {lanes} * {lanes} / (time.monotonic() - began))\n"
    );
    bundle.args = vec!["python3".into(), "-c".into(), program];
    let id = format!("bare-fork-{}", std::process::id());
    let dir = pool.template().state_dir().join("bench-bare").join(&id);
    bundle.write(&dir, &format!("/{BARE_CGROUP_PARENT}/{id}"))?;
    let out = worker
        .runsc()
        .command()
        .arg("run")
        .arg(format!("--bundle={}", dir.display()))
        .arg(&id)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    let _ = std::fs::remove_dir_all(&dir);
    remove_bare_cgroup_parent();
    anyhow::ensure!(out.status.success(), "bare loop failed: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Runs the suite.
///
/// # Errors
/// When the worker cannot start or a job does not come back `ok`.
pub async fn run(config: WorkerConfig, args: Args) -> anyhow::Result<serde_json::Value> {
    let config = only_templates(
        &config,
        &[
            args.process_template.as_str(),
            args.sandbox_template.as_str(),
        ],
    )?;
    let worker = Arc::new(Worker::start(&config).await?);
    let outcome = measure(&worker, &args).await;
    worker.shutdown().await;
    outcome
}

async fn measure(worker: &Arc<Worker>, args: &Args) -> anyhow::Result<serde_json::Value> {
    let slots = warm_pool(worker, &args.process_template)
        .await?
        .template()
        .config
        .process
        .slots;
    // Warm both levels up: a supervised sandbox bound, the sandbox pool filled.
    through_worker(worker, &args.process_template, slots).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let ceiling = bare_fork_loop(worker, &args.process_template, args.jobs, slots).await?;
    let process = through_worker(worker, &args.process_template, args.jobs).await?;
    let sandbox = through_worker(worker, &args.sandbox_template, args.baseline_jobs).await?;
    let rootfs = &worker.pools()[&args.process_template]
        .template()
        .config
        .rootfs;
    let host = host_subprocesses(rootfs, args.baseline_jobs, 2).await?;

    let row = |name: &str, rate: f64| {
        vec![
            name.to_owned(),
            format!("{rate:.1}"),
            format!("{:.2}", rate / ceiling),
        ]
    };
    table(
        "process: trivial Python jobs per second",
        &["method", "per second", "ratio to ceiling"],
        &[
            row("in-sandbox fork loop (ceiling)", ceiling),
            row("shardbox process isolation", process),
            row("shardbox sandbox isolation", sandbox),
            row("host python3 -c, no sandbox", host),
        ],
    );
    Ok(json!({
        "suite": "process",
        "runsc": worker.runsc_version(),
        "slots": slots,
        "ceiling_fork_loop_per_s": ceiling,
        "process_isolation_per_s": process,
        "sandbox_isolation_per_s": sandbox,
        "host_subprocess_per_s": host,
        "ratio_process_to_ceiling": process / ceiling,
        "ratio_process_to_sandbox": process / sandbox,
        "ratios": [
            ratio("python: jobs per second (higher is better)", "shardbox process isolation",
                "in-sandbox fork loop (ceiling)", process / ceiling),
            ratio("python: jobs per second (higher is better)", "shardbox process isolation",
                "shardbox sandbox isolation", process / sandbox),
            ratio("python: jobs per second (higher is better)", "shardbox process isolation",
                "host python3 -c, no sandbox", process / host),
        ],
        "goal": {"ratio_to_ceiling_at_least": 0.9, "ratio_to_sandbox_at_least": 10.0,
            "met": process / ceiling >= 0.9 && process / sandbox >= 10.0},
    }))
}
