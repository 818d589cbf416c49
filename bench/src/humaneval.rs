//! The `humaneval` suite: the 164 HumanEval problems with their reference solutions (the batch
//! `scripts/humaneval.py` makes) end to end through the scheduler library (`run_batch` over a
//! worker serving the `python` template), against the same programs run as host `python3 -c`
//! subprocesses with no sandbox, one per core at a time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shardbox_proto::{JobResult, Status};
use shardbox_scheduler::{run_batch, RunOptions};
use shardbox_worker::{Worker, WorkerConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::report::{host_python, only_templates, ratio, round3, table, PoolSampler};

/// Options of the suite.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// The batch; made with `scripts/humaneval.py --variant canonical` when missing.
    #[arg(long, default_value_os_t = default_batch())]
    pub batch: PathBuf,
    /// The template the batch's jobs name.
    #[arg(long, default_value = "python")]
    pub template: String,
}

/// `$SHARDBOX_CACHE/humaneval/humaneval.jsonl`, where `scripts/demo.sh` puts the batch.
pub fn default_batch() -> PathBuf {
    let cache = std::env::var_os("SHARDBOX_CACHE").unwrap_or_else(|| "/var/cache/shardbox".into());
    Path::new(&cache).join("humaneval").join("humaneval.jsonl")
}

/// Makes the batch with the repository's `scripts/humaneval.py` when it is missing.
async fn ensure_batch(batch: &Path) -> anyhow::Result<()> {
    if batch.is_file() {
        return Ok(());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/humaneval.py");
    anyhow::ensure!(
        script.is_file(),
        "no batch at {} and no {} to make it",
        batch.display(),
        script.display()
    );
    eprintln!(
        "humaneval: making {} with {}",
        batch.display(),
        script.display()
    );
    let status = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--variant", "canonical", "--out"])
        .arg(batch)
        .stdin(Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "{} failed: {status}", script.display());
    Ok(())
}

/// Runs the suite.
///
/// # Errors
/// When the batch cannot be had, the worker cannot start or the run fails.
pub async fn run(config: WorkerConfig, args: Args) -> anyhow::Result<serde_json::Value> {
    ensure_batch(&args.batch).await?;
    let text = tokio::fs::read_to_string(&args.batch).await?;
    let codes: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let job: shardbox_proto::Job = serde_json::from_str(l)?;
            job.code
                .ok_or_else(|| anyhow::anyhow!("job {} has no code", job.id))
        })
        .collect::<anyhow::Result<_>>()?;

    let config = only_templates(&config, &[args.template.as_str()])?;
    let worker = Arc::new(Worker::start(&config).await?);
    let outcome = through_shardbox(&worker, &args).await;
    worker.shutdown().await;
    let shardbox = outcome?;

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rootfs = config.templates[&args.template].rootfs.clone();
    let (host_per_s, host_passed) = host_runs(&rootfs, &codes, cores).await?;

    let n = codes.len();
    let ratio_value = shardbox.per_s / host_per_s;
    table(
        "humaneval: the reference solutions end to end",
        &["method", "jobs", "per second", "pass@1", "vs host"],
        &[
            vec![
                "shardbox (run_batch, sandbox per job)".into(),
                shardbox.results.to_string(),
                format!("{:.2}", shardbox.per_s),
                format!("{:.3}", shardbox.pass_at_1),
                format!("{ratio_value:.3}"),
            ],
            vec![
                "host python3 -c, no sandbox".into(),
                n.to_string(),
                format!("{host_per_s:.2}"),
                format!("{:.3}", host_passed as f64 / n as f64),
                "1".into(),
            ],
        ],
    );
    Ok(json!({
        "suite": "humaneval",
        "batch": args.batch,
        "jobs": n,
        "shardbox": {
            "results": shardbox.results,
            "per_s": shardbox.per_s,
            "wall_s": shardbox.wall_s,
            "pass_at_1": shardbox.pass_at_1,
            "statuses": shardbox.statuses,
            "start_ms_p50": shardbox.start_ms_p50,
            "start_ms_p99": shardbox.start_ms_p99,
        },
        "host": {"per_s": host_per_s, "lanes": cores, "pass_at_1": host_passed as f64 / n as f64},
        "ratios": [ratio("humaneval: jobs per second (higher is better)", "shardbox", "host python3 -c, no sandbox",
            ratio_value)],
        "done_s": shardbox.done_s,
        "pool_idle": shardbox.pool_idle,
    }))
}

/// What the shardbox run gave.
struct Through {
    results: u64,
    per_s: f64,
    wall_s: f64,
    pass_at_1: f64,
    statuses: String,
    start_ms_p50: Option<f64>,
    start_ms_p99: Option<f64>,
    done_s: Vec<f64>,
    pool_idle: serde_json::Value,
}

async fn through_shardbox(worker: &Arc<Worker>, args: &Args) -> anyhow::Result<Through> {
    let batch = BufReader::new(tokio::fs::File::open(&args.batch).await?);
    // Results go through an in-memory pipe to a reader that notes when each one arrives.
    let (results_in, results_out) = tokio::io::duplex(1 << 16);
    let began = Instant::now();
    let arrivals = tokio::spawn(async move {
        let mut lines = BufReader::new(results_out).lines();
        let mut done_s = Vec::new();
        while let Some(line) = lines.next_line().await? {
            let result: JobResult = serde_json::from_str(&line)?;
            if result.status != Status::Invalid {
                done_s.push(round3(began.elapsed().as_secs_f64()));
            }
        }
        anyhow::Ok(done_s)
    });
    let sampler = PoolSampler::start(
        worker,
        &[args.template.as_str()],
        Duration::from_millis(100),
    );
    let summary = run_batch(Arc::clone(worker), batch, results_in, RunOptions::default()).await;
    let pool_idle = sampler.finish().await;
    let summary = summary?;
    let done_s = arrivals.await??;
    let pass_at_1 = summary
        .pass_at_1()
        .map_or(f64::NAN, |(ok, all)| ok as f64 / all as f64);
    Ok(Through {
        results: summary.total(),
        per_s: summary.jobs_per_second(),
        wall_s: summary.wall.as_secs_f64(),
        pass_at_1,
        statuses: summary.status_counts(),
        start_ms_p50: summary.start_us_at(0.5).map(|us| us as f64 / 1e3),
        start_ms_p99: summary.start_us_at(0.99).map(|us| us as f64 / 1e3),
        done_s,
        pool_idle,
    })
}

/// Runs every program as `python3 -c CODE` on the host (the template's interpreter, see
/// [`host_python`]), `lanes` at a time, each with the batch's 10 s limit; returns programs per
/// second and how many exited 0.
async fn host_runs(rootfs: &Path, codes: &[String], lanes: usize) -> anyhow::Result<(f64, usize)> {
    let codes: Arc<Vec<String>> = Arc::new(codes.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..lanes.max(1) {
        let (codes, next, rootfs) = (Arc::clone(&codes), Arc::clone(&next), rootfs.to_owned());
        handles.push(tokio::spawn(async move {
            let mut passed = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(code) = codes.get(i) else {
                    return anyhow::Ok(passed);
                };
                let child = host_python(&rootfs, code)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                if let Ok(status) = tokio::time::timeout(Duration::from_secs(10), child).await {
                    if status?.success() {
                        passed += 1;
                    }
                }
            }
        }));
    }
    let mut passed = 0;
    for handle in handles {
        passed += handle.await??;
    }
    Ok((codes.len() as f64 / began.elapsed().as_secs_f64(), passed))
}
