//! `bench`: shardbox's benchmarks. Every figure is printed beside a baseline measured in the
//! same run, as a ratio, in JSON and as a short table.
//!
//! - `start`: handoff latency from a warm pool against a restore per job and a cold boot per
//!   job of the same template.
//! - `throughput`: fresh sandboxes per second through shardbox against a bare loop of restores,
//!   a `runsc run` per job and a host `python3 -c` per job, for a light and a heavy template.
//! - `process`: jobs per second in process isolation against sandbox isolation, host
//!   subprocesses and a bare fork loop inside one sandbox.
//! - `scheduler`: a million jobs end to end through the scheduler service with simulated
//!   executors, against Ray's no-op tasks.
//! - `humaneval`: the HumanEval batch end to end (jobs per second, pass@1) against host
//!   subprocesses.
//! - `all`: every suite, then `bench.json` and a self-contained `report.html` ([`html`]);
//!   `report` draws the HTML of a saved `bench.json` again.
//!
//! [`report`] holds what the suites share; [`machine`] describes the machine.

mod all;
mod html;
mod humaneval;
mod machine;
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
    /// Worker configuration; the embedded one when absent. The heavy template of
    /// configs/python-sci.toml is added unless the configuration declares it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The workers' state directory (runsc state, images); with the embedded configuration,
    /// /var/lib/shardbox-bench by default, apart from `shardbox run`'s, since a worker deletes
    /// the containers it finds in its state directory.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
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
    /// Fresh-sandbox throughput against a bare restore loop, `runsc run` and host processes.
    Throughput(throughput::Args),
    /// Process isolation against sandbox isolation, host subprocesses and a bare fork loop.
    Process(process::Args),
    /// A million jobs through the scheduler service with simulated executors, against Ray.
    Scheduler(scheduler::Args),
    /// The HumanEval batch end to end against host subprocesses.
    Humaneval(humaneval::Args),
    /// Every suite, then DIR/bench.json and DIR/report.html.
    All(all::Args),
    /// Draws the HTML report of a saved `bench.json` again.
    Report {
        /// The figures of a `bench all` run.
        bench_json: PathBuf,
        /// Where to write the report.
        #[arg(long, default_value = "report.html")]
        out: PathBuf,
    },
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
    if let Suite::Report { bench_json, out } = &cli.suite {
        let run: serde_json::Value = serde_json::from_slice(&std::fs::read(bench_json)?)?;
        std::fs::write(out, html::render(&run)?)?;
        return Ok(());
    }
    let mut config = match &cli.config {
        Some(path) => shardbox_worker::WorkerConfig::load(path)?,
        None => {
            let mut config = shardbox_worker::WorkerConfig::embedded()?;
            config.worker.state_dir = PathBuf::from("/var/lib/shardbox-bench");
            config
        }
    };
    if let Some(dir) = cli.state_dir {
        config.worker.state_dir = dir;
    }
    report::add_sci_template(&mut config)?;
    let rt = tokio::runtime::Runtime::new()?;
    let figures = rt.block_on(async {
        match cli.suite {
            Suite::Start(args) => start::run(config, args).await,
            Suite::Throughput(args) => throughput::run(config, args).await,
            Suite::Process(args) => process::run(config, args).await,
            Suite::Scheduler(args) => scheduler::run(config, args).await,
            Suite::Humaneval(args) => humaneval::run(config, args).await,
            Suite::All(args) => all::run(config, args).await,
            Suite::Report { .. } => unreachable!("drawn above, without a worker"),
        }
    })?;
    let text = serde_json::to_string_pretty(&figures)?;
    println!("{text}");
    if let Some(path) = cli.json {
        std::fs::write(path, text)?;
    }
    Ok(())
}
