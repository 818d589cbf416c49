//! `shardbox`: runs batches of untrusted jobs in gVisor sandboxes restored from checkpoints.
//!
//! This binary only parses arguments, opens files, starts the worker, wires signals and maps
//! failures to exit codes; the scheduling itself is `shardbox_scheduler::run_batch`, the
//! scheduler service's clients are `shardbox_scheduler::client` (`shardbox submit`) and
//! `shardbox_scheduler::agent` (`shardbox worker`).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use shardbox_proto::service::BatchState;
use shardbox_proto::JobResult;
use shardbox_scheduler::agent::{RuntimeExecutor, SimulatedExecutor};
use shardbox_scheduler::progress::Progress;
use shardbox_scheduler::service::{Service, ServiceConfig};
use shardbox_scheduler::{
    exit, run_agent, run_batch, AgentError, AgentOptions, AgentReport, ApiClient, ClientError,
    Executor, RunOptions, Stop, StopLevel, Summary,
};
use shardbox_worker::runsc::Runsc;
use shardbox_worker::{Worker, WorkerConfig};
use tokio::io::{AsyncBufRead, AsyncWriteExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};

/// The scheduler service allocates per job (lines, leases, results); mimalloc keeps that cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const AFTER_HELP: &str = "\
Exit codes: 0 every batch line got a result (whatever the jobs' statuses), or a worker stopped \
on SIGINT/SIGTERM; 2 bad usage or configuration (a missing or refused token too); 3 shardbox \
failed while running (reading the batch, writing results, the scheduler failing); 4 the \
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
    /// Submit a JSONL batch to a scheduler service; with --wait, also fetch its results.
    Submit(SubmitArgs),
    /// Serve a scheduler service: lease its jobs, run them, send back their results.
    Worker(WorkerArgs),
    /// Print the versions of shardbox and of the runsc it would use.
    Version(VersionArgs),
    /// Serve the scheduler's HTTP API: durable batches, leases to remote workers, results.
    Scheduler(SchedulerArgs),
    /// Capacity planning: simulate a fleet of nodes under a virtual clock (runs no code) and
    /// report jobs per hour, queue wait, start latency and utilisation; with --size, find the
    /// smallest fleet meeting the file's target.
    Plan(PlanArgs),
}

#[derive(Debug, clap::Args)]
struct PlanArgs {
    /// The fleet: simulated nodes, workload and target (TOML), such as
    /// configs/fleet-example.toml.
    #[arg(long, value_name = "FILE")]
    fleet: PathBuf,
    /// Simulate this many nodes instead of the file's `nodes.count`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    nodes: Option<u32>,
    /// Simulate this many jobs instead of the file's `workload.jobs`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    jobs: Option<u64>,
    /// Find the smallest node count meeting the file's `[target]`, doubling then bisecting.
    #[arg(long)]
    size: bool,
    /// With --size: give up above this many nodes.
    #[arg(long, value_name = "N", default_value_t = 1 << 20, requires = "size")]
    max_nodes: u32,
    /// Print JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
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

/// Environment variable holding the client token of `shardbox submit`.
const CLIENT_TOKEN_ENV: &str = "SHARDBOX_CLIENT_TOKEN";
/// Environment variable holding the worker token of `shardbox worker`.
const WORKER_TOKEN_ENV: &str = "SHARDBOX_WORKER_TOKEN";

#[derive(Debug, clap::Args)]
struct SubmitArgs {
    /// The batch: one JSON job per line (`-` for standard input), streamed to the scheduler.
    batch: PathBuf,
    /// The scheduler service's URL, such as http://10.0.0.5:7070.
    #[arg(long, value_name = "URL")]
    scheduler: String,
    /// Client token [default: $SHARDBOX_CLIENT_TOKEN].
    #[arg(long, value_name = "T")]
    token: Option<String>,
    /// Name of the batch [default: the batch file's name].
    #[arg(long, value_name = "N")]
    name: Option<String>,
    /// Priority: higher runs first.
    #[arg(
        long,
        value_name = "P",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    priority: i32,
    /// Wait for every result, writing them to --out, then print a summary.
    #[arg(long, requires = "out")]
    wait: bool,
    /// Where results go with --wait, one JSON object per line; created or replaced.
    #[arg(long, value_name = "RESULTS", requires = "wait")]
    out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// The scheduler service's URL, such as http://10.0.0.5:7070.
    #[arg(long, value_name = "URL")]
    scheduler: String,
    /// Worker token [default: $SHARDBOX_WORKER_TOKEN].
    #[arg(long, value_name = "T")]
    token: Option<String>,
    /// Worker configuration (TOML); the configuration built into shardbox by default.
    #[arg(long, value_name = "FILE", conflicts_with = "simulated_executor")]
    config: Option<PathBuf>,
    /// Templates to serve and how many jobs of each run at once, such as python=8,exec=2
    /// [default: every configured template, capacity from its pool settings].
    #[arg(long, value_name = "NAME=N", value_delimiter = ',', value_parser = parse_capacity)]
    templates: Vec<(String, u32)>,
    /// Use the simulated executor: RUNS NO CODE, starts no sandbox and needs no runsc; every
    /// job gets an `ok` result after --job-ms. For benchmarks and tests of the scheduler
    /// alone. Needs --templates.
    #[arg(long, requires = "templates")]
    simulated_executor: bool,
    /// With --simulated-executor: how long each simulated job takes, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 0,
        requires = "simulated_executor"
    )]
    job_ms: u64,
}

fn parse_capacity(text: &str) -> Result<(String, u32), String> {
    let (name, n) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=N"))?;
    let n: u32 = n
        .parse()
        .map_err(|_| format!("{n:?} is not a whole number"))?;
    if name.is_empty() || n == 0 {
        return Err(format!(
            "{text:?}: give a template name and a capacity above 0"
        ));
    }
    Ok((name.to_owned(), n))
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
            Command::Submit(args) => submit(args).await,
            Command::Worker(args) => worker(args).await,
            Command::Version(args) => version(args).await,
            Command::Scheduler(args) => scheduler(args).await,
            Command::Plan(args) => plan(args),
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

/// Prints the summary on stdout, and on stderr as well (beside the log) unless the two are one
/// screen, file or pipe.
fn print_summary(summary: &Summary) {
    print!("{summary}");
    let both_terminals = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    if !both_terminals && !stdout_is_stderr() {
        eprint!("{summary}");
    }
}

/// Whether standard output and standard error are the same open file (as with `2>&1`).
fn stdout_is_stderr() -> bool {
    use std::os::unix::fs::MetadataExt;
    let target = |fd: u8| std::fs::metadata(format!("/proc/self/fd/{fd}")).ok();
    match (target(1), target(2)) {
        (Some(out), Some(err)) => (out.dev(), out.ino()) == (err.dev(), err.ino()),
        _ => false,
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

/// `shardbox plan`: one simulated fleet, or a search for the smallest one meeting the target.
fn plan(args: PlanArgs) -> Result<u8, Failure> {
    use shardbox_scheduler::plan;
    let mut fleet = plan::Fleet::load(&args.fleet).or_exit(exit::USAGE)?;
    if let Some(jobs) = args.jobs {
        fleet.workload.jobs = jobs;
    }
    let nodes = args.nodes.unwrap_or(fleet.nodes.count);
    if !args.size {
        let outcome = plan::plan(&fleet, nodes).or_exit(exit::USAGE)?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&outcome).expect("serializes")
            );
        } else {
            print!("{}", plan::Table(&outcome));
            if let Some(target) = &fleet.target {
                let missed = plan::misses(target, &outcome);
                if missed.is_empty() {
                    println!("target               met");
                } else {
                    println!("target               missed: {}", missed.join("; "));
                }
            }
        }
        return Ok(exit::OK);
    }
    let Some(target) = fleet.target.clone() else {
        return Err(Failure {
            code: exit::USAGE,
            error: anyhow::anyhow!(
                "--size needs a [target] in fleet file {}",
                args.fleet.display()
            ),
        });
    };
    let sizing = plan::size(&fleet, &target, args.max_nodes).or_exit(exit::USAGE)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&sizing).expect("serializes")
        );
        return Ok(exit::OK);
    }
    for tried in &sizing.tried {
        println!(
            "tried {:>8} nodes: {:>14.0} jobs/h, p99 start {} us, p99 queue {} ms: {}",
            tried.nodes,
            tried.jobs_per_hour,
            tried.start_us_p99,
            tried.queue_ms_p99,
            if tried.missed.is_empty() {
                "meets the target".to_owned()
            } else {
                tried.missed.join("; ")
            }
        );
    }
    match (sizing.nodes, &sizing.outcome) {
        (Some(nodes), Some(outcome)) => {
            println!("smallest fleet meeting the target: {nodes} nodes");
            print!("{}", plan::Table(outcome));
        }
        _ => println!(
            "no fleet of up to {} nodes meets the target",
            args.max_nodes
        ),
    }
    Ok(exit::OK)
}

/// `shardbox scheduler`: serves until SIGINT or SIGTERM, then lets open requests finish.
async fn scheduler(args: SchedulerArgs) -> Result<u8, Failure> {
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

/// The token from `flag`, or else from the environment variable `env`.
fn token(flag: Option<String>, env: &str) -> Result<String, Failure> {
    match flag.or_else(|| std::env::var(env).ok()) {
        Some(token) if !token.is_empty() => Ok(token),
        _ => Err(Failure {
            code: exit::USAGE,
            error: anyhow::anyhow!("no token: give --token or set {env}"),
        }),
    }
}

/// The exit code of a failed call: a refused token is a usage error, anything else a runtime
/// failure.
fn client_exit(err: &ClientError) -> u8 {
    match err.status().map(|s| s.as_u16()) {
        Some(401 | 403) => exit::USAGE,
        _ => match err {
            ClientError::Url { .. } | ClientError::Open { .. } => exit::USAGE,
            _ => exit::RUNTIME,
        },
    }
}

fn client_failure(err: ClientError, context: String) -> Failure {
    Failure {
        code: client_exit(&err),
        error: anyhow::Error::new(err).context(context),
    }
}

async fn submit(args: SubmitArgs) -> Result<u8, Failure> {
    let token = token(args.token, CLIENT_TOKEN_ENV)?;
    let client = ApiClient::new(&args.scheduler, token).or_exit(exit::USAGE)?;
    let stdin = args.batch == Path::new("-");
    let out = match &args.out {
        Some(out) => Some(open_out(out, &args.batch)?),
        None => None,
    };
    let name = args.name.clone().unwrap_or_else(|| {
        args.batch
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|_| !stdin)
            .unwrap_or_default()
    });

    let accepted = loop {
        let attempt = if stdin {
            client
                .submit(tokio::io::stdin(), &name, args.priority)
                .await
        } else {
            client.submit_file(&args.batch, &name, args.priority).await
        };
        match attempt {
            Ok(accepted) => break accepted,
            // Only a refusal under load is retried: it comes before the body is stored. A
            // broken upload may have stored part of the batch, so it is not sent again.
            Err(err) if !stdin && err.status().map(|s| s.as_u16()) == Some(503) => {
                let wait = err.retry_after().unwrap_or(Duration::from_secs(1));
                eprintln!(
                    "shardbox: the scheduler is busy; submitting again in {:.1} s",
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
            }
            Err(err) => {
                if let ClientError::Status { body, .. } = &err {
                    if let (Some(batch), Some(kept)) = (body.batch, body.accepted) {
                        eprintln!(
                            "shardbox: batch {batch} was cut short: its first {kept} jobs were \
                             kept and will run"
                        );
                    }
                }
                let what = format!("cannot submit {}", args.batch.display());
                return Err(client_failure(err, what));
            }
        }
    };
    println!(
        "{}",
        serde_json::to_string(&accepted).expect("a batch answer serializes")
    );
    let (Some(out), Some(out_path)) = (out, args.out) else {
        return Ok(exit::OK);
    };
    let out = match out.set_len(0) {
        Ok(()) => tokio::fs::File::from_std(out),
        Err(err) => {
            let context = format!("cannot truncate results file {}", out_path.display());
            return Err(anyhow::Error::new(err).context(context)).or_exit(exit::RUNTIME);
        }
    };
    let progress = Progress::new(std::io::stderr().is_terminal());
    let interrupted = async {
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        std::io::Result::Ok(())
    };
    let waited = tokio::select! {
        waited = follow_results(&client, accepted.batch, out, &progress) => waited,
        signalled = interrupted => {
            progress.finish();
            signalled.context("cannot watch signals").or_exit(exit::RUNTIME)?;
            eprintln!(
                "shardbox: interrupted; batch {} keeps running on the scheduler, results so \
                 far are in {}",
                accepted.batch,
                out_path.display()
            );
            return Ok(exit::INTERRUPTED);
        }
    };
    progress.finish();
    let summary = waited
        .with_context(|| format!("results so far are in {}", out_path.display()))
        .or_exit(exit::RUNTIME)?;
    print_summary(&summary);
    Ok(exit::OK)
}

/// Why waiting for a batch's results failed.
#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error("cannot fetch the results of batch {batch}")]
    Fetch {
        batch: u64,
        #[source]
        source: ClientError,
    },
    #[error("cannot write results")]
    Write(#[source] std::io::Error),
}

/// Streams the results of `batch` into `out` until it has them all, resuming after the number
/// of lines received whenever the connection drops or the scheduler restarts.
async fn follow_results(
    client: &ApiClient,
    batch: u64,
    out: tokio::fs::File,
    progress: &Progress,
) -> Result<Summary, FollowError> {
    let started = Instant::now();
    let mut out = tokio::io::BufWriter::with_capacity(64 << 10, out);
    let mut summary = Summary::new();
    let mut received: u64 = 0;
    let mut unreadable: u64 = 0;
    let mut failures: u32 = 0;
    let fetch = |source| FollowError::Fetch { batch, source };
    progress.start();
    loop {
        // Where the batch stands: its size for the bar, and whether every result is in.
        let status = match client.batch(batch).await {
            Ok(status) => Some(status),
            Err(err) if err.is_retryable() => {
                wait_retry(progress, &err, &mut failures).await;
                continue;
            }
            Err(err) => return Err(fetch(err)),
        };
        if let Some(status) = &status {
            progress.set_known(status.lines);
            if status.state == BatchState::Done && received >= status.results {
                break;
            }
        }
        let mut lines = match client.results(batch, received, true).await {
            Ok(lines) => lines,
            Err(err) if err.is_retryable() => {
                wait_retry(progress, &err, &mut failures).await;
                continue;
            }
            Err(err) => return Err(fetch(err)),
        };
        let before = received;
        while let Some(line) = lines.next().await {
            let line = match line {
                Ok(line) => line,
                Err(err) => {
                    wait_retry(progress, &err, &mut failures).await;
                    break;
                }
            };
            failures = 0;
            out.write_all(&line).await.map_err(FollowError::Write)?;
            out.write_all(b"\n").await.map_err(FollowError::Write)?;
            received += 1;
            match serde_json::from_slice::<JobResult>(&line) {
                Ok(result) => summary.record(&result),
                Err(err) => {
                    unreadable += 1;
                    tracing::warn!(line = received, error = %err, "a result line does not parse");
                }
            }
            progress.add_done(&summary);
        }
        out.flush().await.map_err(FollowError::Write)?;
        if received == before {
            // The stream ended with nothing new although the batch is not done: do not spin.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    out.shutdown().await.map_err(FollowError::Write)?;
    if unreadable > 0 {
        progress.println(&format!(
            "shardbox: {unreadable} result lines were not JSON results (written as received)"
        ));
    }
    summary.wall = started.elapsed();
    Ok(summary)
}

/// Waits before fetching again after `err`: longer after each failure in a row, up to 10 s.
async fn wait_retry(progress: &Progress, err: &ClientError, failures: &mut u32) {
    *failures += 1;
    let wait = Duration::from_millis(200u64 << (*failures).min(6)).min(Duration::from_secs(10));
    if *failures == 1 || (*failures).is_multiple_of(10) {
        progress.println(&format!(
            "shardbox: {}; retrying in {:.1} s",
            anyhow_chain(err),
            wait.as_secs_f64()
        ));
    }
    tokio::time::sleep(wait).await;
}

fn anyhow_chain(err: &ClientError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn worker(args: WorkerArgs) -> Result<u8, Failure> {
    let token = token(args.token, WORKER_TOKEN_ENV)?;
    let client = ApiClient::new(&args.scheduler, token).or_exit(exit::USAGE)?;
    let overrides: BTreeMap<String, u32> = args.templates.into_iter().collect();
    let stop = Stop::new();
    watch_signals(stop.clone(), Progress::hidden())
        .context("cannot install signal handlers")
        .or_exit(exit::RUNTIME)?;

    if args.simulated_executor {
        let name = format!("simulated-{}", std::process::id());
        eprintln!(
            "shardbox: worker {name} uses the simulated executor: it runs no code, every job \
             gets an `ok` result after {} ms",
            args.job_ms
        );
        let executor = SimulatedExecutor::new(name, overrides, Duration::from_millis(args.job_ms));
        return serve(client, Arc::new(executor), stop).await;
    }

    let config = load_config(args.config.as_deref())?;
    for template in overrides.keys() {
        if !config.templates.contains_key(template) {
            return Err(Failure {
                code: exit::USAGE,
                error: anyhow::anyhow!("--templates names {template:?}, which is not configured"),
            });
        }
    }
    eprintln!("shardbox: starting the worker: building or loading its templates");
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
    let templates = if overrides.is_empty() {
        RuntimeExecutor::default_templates(&worker)
    } else {
        overrides
    };
    eprintln!(
        "shardbox: worker {} ready ({}); serving {} at {}",
        worker.name(),
        worker.runsc_version(),
        templates
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect::<Vec<_>>()
            .join(","),
        client.base()
    );
    serve(
        client,
        Arc::new(RuntimeExecutor::new(worker, templates)),
        stop,
    )
    .await
}

/// Runs the pull loop until a stop, and reports how it went.
async fn serve<E: Executor>(
    client: ApiClient,
    executor: Arc<E>,
    stop: Stop,
) -> Result<u8, Failure> {
    match run_agent(client, executor, AgentOptions::default(), stop).await {
        Ok(report) => {
            print_report(&report);
            Ok(exit::OK)
        }
        Err(err) => {
            let code = match &err {
                AgentError::Register { source, .. } | AgentError::Lease { source, .. } => {
                    client_exit(source)
                }
            };
            Err(Failure {
                code,
                error: err.into(),
            })
        }
    }
}

fn print_report(report: &AgentReport) {
    eprintln!(
        "shardbox: worker stopped: {} jobs leased, {} results sent, {} registrations{}",
        report.leased,
        report.sent,
        report.registrations,
        if report.dropped > 0 {
            format!(", {} results given up", report.dropped)
        } else {
            String::new()
        }
    );
}
