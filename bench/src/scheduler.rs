//! `bench scheduler`: one million jobs through the scheduler service, end to end, with
//! simulated executors (no sandbox, no code run), against Ray's no-op tasks on this machine.
//!
//! The scheduler and the simulated-executor workers are the release `shardbox` binary, each
//! its own process, talking HTTP on loopback; durability is on (every commit is fsynced). The
//! clock runs from the first byte of the batch sent to the last result received, with the
//! results stream followed while the batch is still uploading.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde_json::json;
use shardbox_scheduler::ApiClient;
use shardbox_worker::WorkerConfig;

use crate::report::{ratio, table};

const CLIENT_TOKEN: &str = "bench-client-token-000000";
const WORKER_TOKEN: &str = "bench-worker-token-000000";

/// Options of the scheduler suite.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Jobs pushed through the scheduler.
    #[arg(long, default_value_t = 1_000_000)]
    pub jobs: u64,
    /// Worker processes, each with a simulated executor.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Jobs each simulated executor runs at once.
    #[arg(long, default_value_t = 4096)]
    pub capacity: u32,
    /// Ray no-op tasks for the peer figure (0 skips Ray).
    #[arg(long, default_value_t = 20_000)]
    pub ray_tasks: u64,
}

/// A child process ended by SIGTERM (then SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn shardbox_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("shardbox");
    if !path.exists() {
        bail!(
            "{} not found: build it beside bench (cargo build --release -p shardbox-scheduler)",
            path.display()
        );
    }
    Ok(path)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Resident memory of `pid` in KiB: (current, peak).
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn write_batch(path: &Path, jobs: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for n in 0..jobs {
        writeln!(out, r#"{{"id":"job-{n}","code":"pass"}}"#)?;
    }
    out.flush()?;
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Runs the suite.
pub async fn run(_config: WorkerConfig, args: Args) -> anyhow::Result<serde_json::Value> {
    let binary = shardbox_binary()?;
    let dir = tempfile::Builder::new()
        .prefix("shardbox-bench-scheduler")
        .tempdir()?;
    let data = dir.path().join("store");
    let port = free_port()?;
    let config = dir.path().join("scheduler.toml");
    std::fs::write(
        &config,
        format!(
            "[scheduler]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
             client_tokens = [\"{CLIENT_TOKEN}\"]\nworker_tokens = [\"{WORKER_TOKEN}\"]\n",
            data.display()
        ),
    )?;
    let batch = dir.path().join("batch.jsonl");
    write_batch(&batch, args.jobs)?;
    let log = std::fs::File::create(dir.path().join("scheduler.log"))?;
    let scheduler = Proc(
        Command::new(&binary)
            .args(["scheduler", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start the scheduler")?,
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = ApiClient::new(&base, CLIENT_TOKEN)?;
    let ready = Instant::now();
    while client.health().await.is_err() {
        if ready.elapsed() > Duration::from_secs(20) {
            bail!("the scheduler did not answer /health within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut workers = Vec::new();
    for _ in 0..args.workers {
        workers.push(Proc(
            Command::new(&binary)
                .args([
                    "worker",
                    "--simulated-executor",
                    "--job-ms",
                    "0",
                    "--templates",
                ])
                .arg(format!("python={}", args.capacity))
                .args(["--scheduler", &base])
                .env("SHARDBOX_WORKER_TOKEN", WORKER_TOKEN)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start a simulated-executor worker")?,
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    eprintln!(
        "bench scheduler: {} jobs through the scheduler with {} simulated-executor workers",
        args.jobs, args.workers
    );
    let name = format!("bench-{}", std::process::id());
    let start = Instant::now();
    let upload = {
        let client = client.clone();
        let batch = batch.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let accepted = client.submit_file(&batch, &name, 0).await;
            (accepted, start.elapsed())
        })
    };
    // The batch is listed from its first commit: follow its results while it uploads.
    let id = loop {
        let listed = client.batches().await?;
        if let Some(status) = listed.iter().find(|b| b.name == name) {
            break status.batch;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let scheduler_pid = scheduler.0.id();
    let mut received = 0u64;
    let mut per_tenth: Vec<u64> = Vec::new();
    let mut rss_mib: Vec<f64> = Vec::new();
    let mut last_sample = Instant::now();
    while received < args.jobs {
        let mut lines = client.results(id, received, true).await?;
        while let Some(line) = lines.next().await {
            if line.is_err() {
                break;
            }
            received += 1;
            let tenth = (start.elapsed().as_millis() / 100) as usize;
            if per_tenth.len() <= tenth {
                per_tenth.resize(tenth + 1, 0);
            }
            per_tenth[tenth] += 1;
            if last_sample.elapsed() >= Duration::from_millis(100) {
                rss_mib.push(memory_kib(scheduler_pid).0 as f64 / 1024.0);
                last_sample = Instant::now();
            }
        }
        if start.elapsed() > Duration::from_secs(900) {
            bail!("only {received} of {} results after 15 minutes", args.jobs);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let (accepted, upload_time) = upload.await?;
    let accepted = accepted?;
    if accepted.accepted != args.jobs {
        bail!(
            "the scheduler accepted {} of {} jobs",
            accepted.accepted,
            args.jobs
        );
    }
    let (_, peak_kib) = memory_kib(scheduler_pid);
    let store_bytes = dir_bytes(&data);
    drop(workers);
    drop(scheduler);
    let jobs_per_s = args.jobs as f64 / seconds;

    let ray = if args.ray_tasks > 0 {
        ray_noop(args.ray_tasks).unwrap_or_else(|err| json!({"error": format!("{err:#}")}))
    } else {
        json!({"skipped": true})
    };
    let ray_rate = ray["tasks_per_s"].as_f64();
    let mut rows = vec![vec![
        format!(
            "shardbox scheduler, {} simulated-executor workers",
            args.workers
        ),
        format!("{jobs_per_s:.0}"),
        format!("{:.1}", peak_kib as f64 / 1024.0),
    ]];
    if let Some(rate) = ray_rate {
        rows.push(vec![
            "Ray no-op tasks (peer)".into(),
            format!("{rate:.0}"),
            ray["peak_rss_mb"]
                .as_f64()
                .map_or("-".into(), |m| format!("{m:.0}")),
        ]);
    }
    table(
        &format!("scheduler: {} jobs end to end, durability on", args.jobs),
        &["method", "jobs/s", "peak MiB"],
        &rows,
    );
    if let Some(rate) = ray_rate {
        eprintln!("shardbox scheduler / Ray: {:.1}x", jobs_per_s / rate);
    }
    Ok(json!({
        "suite": "scheduler",
        "executor": "simulated",
        "jobs": args.jobs,
        "workers": args.workers,
        "capacity_per_worker": args.capacity,
        "seconds": seconds,
        "jobs_per_s": jobs_per_s,
        "upload_seconds": upload_time.as_secs_f64(),
        "scheduler_peak_rss_mib": peak_kib as f64 / 1024.0,
        "scheduler_rss_mib_every_100ms": rss_mib,
        "results_per_100ms": per_tenth,
        "store_bytes": store_bytes,
        "goal_jobs_per_s": 100_000,
        "ray": ray,
        "ratio_vs_ray": ray_rate.map(|rate| jobs_per_s / rate),
        "ratios": ray_rate.map(|rate| vec![ratio(
            "jobs/s end to end",
            "shardbox scheduler, simulated executors, durable",
            "Ray no-op tasks",
            jobs_per_s / rate,
        )]).unwrap_or_default(),
    }))
}

/// Ray's no-op task throughput, through `bench/peers/ray_noop.sh` (which installs Ray in a
/// private virtual environment the first time).
fn ray_noop(tasks: u64) -> anyhow::Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/ray_noop.sh");
    eprintln!(
        "bench scheduler: Ray peer, {tasks} no-op tasks ({})",
        script.display()
    );
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let output = Command::new("bash")
        .arg(&script)
        .args(["--tasks", &tasks.to_string(), "--cpus", &cpus.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run the Ray peer")?;
    if !output.status.success() {
        bail!("the Ray peer failed ({})", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("unreadable Ray figures: {line:?}"))
}
