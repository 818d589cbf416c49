//! The `start` suite: how long from the worker taking a job to the job's input being written
//! into a running sandbox.
//!
//! - *warm pool*: jobs arrive at a steady rate below the pool's refill rate and are handed to
//!   sandboxes restored in advance; the time counts from asking the pool, so a job that finds
//!   it empty counts its wait for a refill.
//! - *restore per job*: each job waits for a restore of the same checkpoint (no pool).
//! - *cold per job*: each job waits for a cold boot of the same template (`runsc run`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shardbox_proto::{Job, Status};
use shardbox_worker::sandbox::FillMethod;
use shardbox_worker::{Slot, Worker, WorkerConfig};

use crate::report::{only_templates, quantile, ratio, rounded, table, warm_pool, PoolSampler};

/// Options of the suite.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Template to measure.
    #[arg(long, default_value = "python")]
    pub template: String,
    /// Jobs through the warm pool.
    #[arg(long, default_value_t = 100)]
    pub pool_jobs: usize,
    /// Arrival rate of pool jobs, per second (keep it below the refill rate).
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Jobs for each of the per-job baselines.
    #[arg(long, default_value_t = 10)]
    pub baseline_jobs: usize,
}

fn job(i: usize) -> Job {
    Job {
        id: format!("start-{i}"),
        code: Some("print(1)".into()),
        ..Job::default()
    }
}

/// Runs the suite.
///
/// # Errors
/// When the worker cannot start or a job does not come back `ok`.
pub async fn run(config: WorkerConfig, args: Args) -> anyhow::Result<serde_json::Value> {
    let config = only_templates(&config, &[args.template.as_str()])?;
    let worker = Arc::new(Worker::start(&config).await?);
    let outcome = measure(&worker, &args).await;
    worker.shutdown().await;
    outcome
}

async fn measure(worker: &Arc<Worker>, args: &Args) -> anyhow::Result<serde_json::Value> {
    let pool = warm_pool(worker, &args.template).await?;
    let sampler = PoolSampler::start(
        worker,
        &[args.template.as_str()],
        Duration::from_millis(100),
    );

    let mut pool_us = Vec::new();
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut tasks = Vec::new();
    let began = tokio::time::Instant::now();
    for i in 0..args.pool_jobs {
        tokio::time::sleep_until(began + period * i as u32).await;
        let worker = Arc::clone(worker);
        let template = args.template.clone();
        tasks.push(tokio::spawn(async move {
            let prepared = worker
                .prepare(Job {
                    template: Some(template),
                    ..job(i)
                })
                .map_err(anyhow::Error::msg)?;
            // Taken before the pool is asked, so that waiting for an empty pool to refill counts
            // as it does for a job.
            let taken = Instant::now();
            let sandbox = worker.acquire(&prepared.template).await?;
            let result = worker.run(sandbox, &prepared, taken).await;
            anyhow::ensure!(result.status == Status::Ok, "pool job failed: {result:?}");
            Ok(result.timing.start_us as f64)
        }));
    }
    for task in tasks {
        pool_us.push(task.await??);
    }
    let pool_idle = sampler.finish().await;

    let per_job = |method: FillMethod| {
        let worker = Arc::clone(worker);
        let pool = Arc::clone(&pool);
        let template = args.template.clone();
        let n = args.baseline_jobs;
        async move {
            let mut samples = Vec::new();
            for i in 0..n {
                let prepared = worker
                    .prepare(Job {
                        template: Some(template.clone()),
                        ..job(10_000 + i)
                    })
                    .map_err(anyhow::Error::msg)?;
                let taken = Instant::now();
                let sandbox = pool.template().start(method).await?;
                let result = worker
                    .run(Slot::Sandbox(Box::new(sandbox)), &prepared, taken)
                    .await;
                anyhow::ensure!(
                    result.status == Status::Ok,
                    "baseline job failed: {result:?}"
                );
                samples.push(result.timing.start_us as f64);
            }
            anyhow::Ok(samples)
        }
    };
    let restore_us = per_job(FillMethod::Restore).await?;
    let cold_us = per_job(FillMethod::Cold).await?;

    let stats = |xs: &[f64]| (quantile(xs, 0.5), quantile(xs, 0.99));
    let (pool_p50, pool_p99) = stats(&pool_us);
    let (restore_p50, restore_p99) = stats(&restore_us);
    let (cold_p50, cold_p99) = stats(&cold_us);
    let ms = |us: f64| format!("{:.3}", us / 1000.0);
    table(
        "start: from taking a job to its input written into a running sandbox (ms)",
        &["method", "jobs", "p50", "p99", "p50 / pool p50"],
        &[
            vec![
                "warm pool".into(),
                pool_us.len().to_string(),
                ms(pool_p50),
                ms(pool_p99),
                "1".into(),
            ],
            vec![
                "restore per job".into(),
                restore_us.len().to_string(),
                ms(restore_p50),
                ms(restore_p99),
                format!("{:.0}", restore_p50 / pool_p50),
            ],
            vec![
                "cold boot per job".into(),
                cold_us.len().to_string(),
                ms(cold_p50),
                ms(cold_p99),
                format!("{:.0}", cold_p50 / pool_p50),
            ],
        ],
    );
    Ok(json!({
        "suite": "start",
        "template": args.template,
        "runsc": worker.runsc_version(),
        "arrival_rate_per_s": args.rate,
        "warm_pool": {"jobs": pool_us.len(), "p50_ms": pool_p50 / 1e3, "p99_ms": pool_p99 / 1e3},
        "restore_per_job": {"jobs": restore_us.len(), "p50_ms": restore_p50 / 1e3,
            "p99_ms": restore_p99 / 1e3},
        "cold_per_job": {"jobs": cold_us.len(), "p50_ms": cold_p50 / 1e3, "p99_ms": cold_p99 / 1e3},
        "ratio_restore_to_pool_p50": restore_p50 / pool_p50,
        "ratio_cold_to_pool_p50": cold_p50 / pool_p50,
        "ratios": [
            ratio(&format!("{}: p50 start latency (lower is better)", args.template),
                "warm pool", "restore per job", pool_p50 / restore_p50),
            ratio(&format!("{}: p50 start latency (lower is better)", args.template),
                "warm pool", "cold boot per job", pool_p50 / cold_p50),
        ],
        "samples_ms": {
            "warm pool": rounded(&pool_us.iter().map(|us| us / 1e3).collect::<Vec<_>>()),
            "restore per job": rounded(&restore_us.iter().map(|us| us / 1e3).collect::<Vec<_>>()),
            "cold boot per job": rounded(&cold_us.iter().map(|us| us / 1e3).collect::<Vec<_>>()),
        },
        "pool_idle": pool_idle,
        "goal": {"pool_p50_ms_at_most": 2.0, "pool_p99_ms_at_most": 10.0,
            "met": pool_p50 <= 2000.0 && pool_p99 <= 10_000.0},
    }))
}
