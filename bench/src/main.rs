//! `bench`: shardbox's benchmarks. Every figure is printed beside a baseline measured in the
//! same run, as a ratio, in JSON and as a short table.
//!
//! - `start`: handoff latency from a warm pool against a restore per job and a cold boot per
//!   job of the same template.
//! - `throughput`: fresh sandboxes per second through shardbox against a bare loop of restores.
//! - `process`: jobs per second in process isolation against sandbox isolation, host
//!   subprocesses and a bare fork loop inside one sandbox.
//! - `scheduler`: a million jobs end to end through the scheduler service with simulated
//!   executors, against Ray's no-op tasks.

mod process;
mod report;
mod scheduler;
mod start;
mod throughput;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "shardbox benchmarks, each against a baseline of the same run"
)]
struct Cli {
    /// Worker configuration; the embedded one when absent.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Where to write the JSON figures (also printed).
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// Handoff latency: warm pool against restore per job and cold boot per job.
    Start(start::Args),
    /// Fresh-sandbox throughput against a bare loop of restores.
    Throughput(throughput::Args),
    /// Process isolation against sandbox isolation, host subprocesses and a bare fork loop.
    Process(process::Args),
    /// A million jobs through the scheduler service with simulated executors, against Ray.
    Scheduler(scheduler::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHARDBOX_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = match &cli.config {
        Some(path) => shardbox_worker::WorkerConfig::load(path)?,
        None => shardbox_worker::WorkerConfig::embedded()?,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let figures = rt.block_on(async {
        match cli.suite {
            Suite::Start(args) => start::run(config, args).await,
            Suite::Throughput(args) => throughput::run(config, args).await,
            Suite::Process(args) => process::run(config, args).await,
            Suite::Scheduler(args) => scheduler::run(config, args).await,
        }
    })?;
    let text = serde_json::to_string_pretty(&figures)?;
    println!("{text}");
    if let Some(path) = cli.json {
        std::fs::write(path, text)?;
    }
    Ok(())
}
