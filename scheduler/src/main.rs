//! `shardbox`: runs batches of untrusted jobs in gVisor sandboxes restored from checkpoints.
//!
//! This binary only parses arguments, opens files, starts the worker, wires signals and maps
//! failures to exit codes; the scheduling itself is `shardbox_scheduler::run_batch`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shardbox_scheduler::progress::Progress;
use shardbox_scheduler::service::{Service, ServiceConfig};
use shardbox_scheduler::{exit, run_batch, RunOptions, Stop, StopLevel, Summary};
use shardbox_worker::runsc::Runsc;
use shardbox_worker::{Worker, WorkerConfig};
use tokio::io::{AsyncBufRead, BufReader};
use tokio::signal::unix::{signal, SignalKind};

const AFTER_HELP: &str = "\
Exit codes: 0 every batch line got a result (whatever the jobs' statuses); 2 bad usage or \
configuration; 3 shardbox failed while running (reading the batch, writing results); 4 the \
sandbox system could not start (runsc, cgroups, rootfs, template build); 130 interrupted.

Logging goes to stderr, filtered by SHARDBOX_LOG (default `warn`, e.g. SHARDBOX_LOG=debug).";

#[derive(Debug, Parser)]
#[command(name = "shardbox", version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a JSONL batch of jobs and write one JSON result per line, in completion order.
    Run(RunArgs),
    /// Print the versions of shardbox and of the runsc it would use.
    Version(VersionArgs),
    /// Serve the scheduler's HTTP API: durable batches, leases to remote workers, results.
    Scheduler(SchedulerArgs),
}

#[derive(Debug, clap::Args)]
struct SchedulerArgs {
    /// Scheduler configuration (TOML with a `[scheduler]` table), such as
    /// configs/scheduler.toml.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Address to listen on, overriding the configuration's `listen`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The batch: one JSON job per line (`-` for standard input).
    batch: PathBuf,
    /// Where results go, one JSON object per line; created or replaced.
    #[arg(long, value_name = "RESULTS")]
    out: PathBuf,
    /// Worker configuration (TOML); the configuration built into shardbox by default.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Jobs running at once over all templates [default: twice the CPUs].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_running: Option<u32>,
}

#[derive(Debug, clap::Args)]
struct VersionArgs {
    /// Worker configuration naming the runsc binary.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// A failure of shardbox itself, with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

trait OrExit<T> {
    fn or_exit(self, code: u8) -> Result<T, Failure>;
}

impl<T, E: Into<anyhow::Error>> OrExit<T> for Result<T, E> {
    fn or_exit(self, code: u8) -> Result<T, Failure> {
        self.map_err(|err| Failure {
            code,
            error: err.into(),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("shardbox: error: cannot start the async runtime: {err}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Version(args) => version(args).await,
            Command::Scheduler(args) => serve(args).await,
        }
    });
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("shardbox: error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHARDBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn load_config(path: Option<&Path>) -> Result<WorkerConfig, Failure> {
    match path {
        Some(path) => WorkerConfig::load(path),
        None => WorkerConfig::embedded(),
    }
    .or_exit(exit::USAGE)
}

async fn version(args: VersionArgs) -> Result<u8, Failure> {
    println!("shardbox {}", env!("CARGO_PKG_VERSION"));
    let config = load_config(args.config.as_deref())?;
    let runsc = Runsc::new(&config.runsc, config.worker.state_dir.join("runsc"));
    match runsc.version().await {
        Ok(version) => println!("{version}"),
        Err(err) => println!("runsc: {err}"),
    }
    Ok(exit::OK)
}

async fn run(args: RunArgs) -> Result<u8, Failure> {
    let config = load_config(args.config.as_deref())?;
    let batch = open_batch(&args.batch).await?;
    let out = open_out(&args.out, &args.batch)?;

    let stop = Stop::new();
    let progress = Progress::new(std::io::stderr().is_terminal());
    watch_signals(stop.clone(), progress.clone())
        .context("cannot install signal handlers")
        .or_exit(exit::RUNTIME)?;

    eprintln!(
        "shardbox: starting the worker: building or loading templates {} (the first build \
         takes up to a minute; later starts use the cache)",
        config
            .templates
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let starting = Instant::now();
    let worker = tokio::select! {
        worker = Worker::start(&config) => worker
            .context("the worker could not start")
            .or_exit(exit::SANDBOX)?,
        () = stop.wait_for(StopLevel::Drain) => {
            eprintln!("shardbox: interrupted while starting the worker");
            return Ok(exit::INTERRUPTED);
        }
    };
    let worker = Arc::new(worker);
    eprintln!(
        "shardbox: worker {} ready in {:.1} s ({}); running {}",
        worker.name(),
        starting.elapsed().as_secs_f64(),
        worker.runsc_version(),
        args.batch.display()
    );

    let out = match out.set_len(0) {
        Ok(()) => tokio::fs::File::from_std(out),
        Err(err) => {
            worker.shutdown().await;
            let err = anyhow::Error::new(err).context(format!(
                "cannot truncate results file {}",
                args.out.display()
            ));
            return Err(Failure {
                code: exit::RUNTIME,
                error: err,
            });
        }
    };
    let mut options = RunOptions {
        progress,
        stop: stop.clone(),
        ..RunOptions::default()
    };
    if let Some(n) = args.max_running {
        options.max_running = n as usize;
    }
    let outcome = run_batch(Arc::clone(&worker), batch, out, options).await;
    if let Ok(summary) = &outcome {
        print_summary(summary);
    }
    eprintln!("shardbox: stopping the worker (destroying its idle sandboxes)");
    worker.shutdown().await;
    outcome
        .with_context(|| format!("results so far are in {}", args.out.display()))
        .or_exit(exit::RUNTIME)?;
    if stop.reached(StopLevel::Drain) {
        eprintln!(
            "shardbox: interrupted; jobs that did not run have `cancelled` results in {}",
            args.out.display()
        );
        return Ok(exit::INTERRUPTED);
    }
    Ok(exit::OK)
}

/// Prints the summary on stdout, and on stderr as well unless both are the same screen.
fn print_summary(summary: &Summary) {
    print!("{summary}");
    if !(std::io::stdout().is_terminal() && std::io::stderr().is_terminal()) {
        eprint!("{summary}");
    }
}

type BatchInput = Box<dyn AsyncBufRead + Unpin + Send>;

async fn open_batch(path: &Path) -> Result<BatchInput, Failure> {
    if path == Path::new("-") {
        return Ok(Box::new(BufReader::new(tokio::io::stdin())));
    }
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open batch file {}", path.display()))
        .or_exit(exit::USAGE)?;
    Ok(Box::new(BufReader::with_capacity(256 << 10, file)))
}

/// Opens (creating, not yet truncating) the results file, so that a bad path is reported
/// before the worker spends time starting, and an old results file survives a failed start.
fn open_out(path: &Path, batch: &Path) -> Result<std::fs::File, Failure> {
    if same_file(path, batch) {
        return Err(Failure {
            code: exit::USAGE,
            error: anyhow::anyhow!(
                "the results file {} is the batch file; give --out another path",
                path.display()
            ),
        });
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot create results file {}", path.display()))
        .or_exit(exit::USAGE)
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// First SIGINT or SIGTERM: take no new jobs. Second: cancel running jobs too.
fn watch_signals(stop: Stop, progress: Progress) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            if stop.drain() {
                progress.println(&format!(
                    "shardbox: {name}: starting no more jobs; waiting for running jobs to \
                     finish (send it again to cancel them)"
                ));
            } else if stop.abort() {
                progress.println(&format!("shardbox: {name} again: cancelling running jobs"));
            }
        }
    });
    Ok(())
}

/// `shardbox scheduler`: serves until SIGINT or SIGTERM, then lets open requests finish.
async fn serve(args: SchedulerArgs) -> Result<u8, Failure> {
    let mut config = ServiceConfig::load(&args.config).or_exit(exit::USAGE)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")
        .or_exit(exit::RUNTIME)?;
    let data_dir = config.data_dir.clone();
    let mut service = Service::start(config, Some(metrics))
        .await
        .with_context(|| {
            format!(
                "the scheduler could not start (store in {})",
                data_dir.display()
            )
        })
        .or_exit(exit::RUNTIME)?;
    eprintln!("shardbox: scheduler listening on http://{}", service.addr);
    let mut interrupt = signal(SignalKind::interrupt()).or_exit(exit::RUNTIME)?;
    let mut terminate = signal(SignalKind::terminate()).or_exit(exit::RUNTIME)?;
    tokio::select! {
        outcome = service.wait() => {
            outcome.context("the scheduler failed").or_exit(exit::RUNTIME)?;
            return Ok(exit::RUNTIME);
        }
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("shardbox: stopping the scheduler; everything accepted is on disk");
    service
        .stop()
        .await
        .context("the scheduler failed while stopping")
        .or_exit(exit::RUNTIME)?;
    Ok(exit::OK)
}
