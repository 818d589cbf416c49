//! `bench all`: every suite in turn, at sizes that fit in 15 minutes on two cores, then
//! `DIR/bench.json` (the machine's description and every suite's figures) and `DIR/report.html`.
//! Both files are rewritten after each suite, so an interrupted run keeps what it measured. A
//! suite that fails is recorded with its error and the others still run.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};
use shardbox_worker::WorkerConfig;

use crate::report::{format_ratio, round3, table};
use crate::{html, humaneval, machine, process, scheduler, start, throughput};

/// Options of `bench all`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory for `bench.json` and `report.html`; made when missing.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

/// Runs every suite.
///
/// # Errors
/// When the output cannot be written, or after writing it when a suite failed.
pub async fn run(config: WorkerConfig, args: Args) -> anyhow::Result<Value> {
    std::fs::create_dir_all(&args.out)?;
    let began = Instant::now();
    let mut run = json!({
        "machine": machine::describe(&config).await,
        "state_dir": config.worker.state_dir,
        "suites": {},
    });

    // Sizes: about 5 fresh sandboxes per second on two cores; each suite's share is noted.
    // start: 50 pool jobs at 1 per second (well below the refill rate of about 2.4 restores per
    // second measured here under load) plus 2 x 8 per-job starts, about 65 s.
    let args_start = start::Args {
        template: "python".into(),
        pool_jobs: 50,
        rate: 1.0,
        baseline_jobs: 8,
    };
    suite(
        &mut run,
        &args.out,
        "start",
        start::run(config.clone(), args_start),
    )
    .await?;

    // throughput: per template 30 + 30 fresh sandboxes, 12 cold boots, 60 host processes;
    // about 40 s for the light template and 60 s for the heavy one.
    let args_throughput = throughput::Args {
        templates: vec!["python".into(), crate::report::SCI_TEMPLATE.into()],
        jobs: 30,
        restores: 30,
        cold_jobs: 12,
        host_jobs: 60,
    };
    let throughput = throughput::run(config.clone(), args_throughput);
    suite(&mut run, &args.out, "throughput", throughput).await?;

    // process: 200 forked jobs twice (ceiling and shardbox), 20 sandboxes, about 60 s.
    let args_process = process::Args {
        process_template: "python-process".into(),
        sandbox_template: "python".into(),
        jobs: 200,
        baseline_jobs: 20,
    };
    suite(
        &mut run,
        &args.out,
        "process",
        process::run(config.clone(), args_process),
    )
    .await?;

    // scheduler: a million jobs with simulated executors, about 20 s, then 20,000 Ray no-op
    // tasks, about 20 s (plus Ray's one-time install into its own virtual environment).
    let args_scheduler = scheduler::Args {
        jobs: 1_000_000,
        workers: 2,
        capacity: 4096,
        ray_tasks: 20_000,
    };
    let scheduler = scheduler::run(config.clone(), args_scheduler);
    suite(&mut run, &args.out, "scheduler", scheduler).await?;

    // humaneval: 164 fresh sandboxes, about 50 s, and 164 host processes.
    let args_humaneval = humaneval::Args {
        batch: humaneval::default_batch(),
        template: "python".into(),
    };
    let humaneval = humaneval::run(config.clone(), args_humaneval);
    suite(&mut run, &args.out, "humaneval", humaneval).await?;

    run["wall_s"] = json!(round3(began.elapsed().as_secs_f64()));
    write(&run, &args.out)?;
    print_ratios(&run);
    eprintln!(
        "\nbench all: {:.0} s; wrote {} and {}",
        began.elapsed().as_secs_f64(),
        args.out.join("bench.json").display(),
        args.out.join("report.html").display()
    );
    let failed: Vec<&String> = run["suites"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, figures)| figures.get("error").is_some())
        .map(|(name, _)| name)
        .collect();
    anyhow::ensure!(failed.is_empty(), "suites failed: {failed:?}");
    Ok(run)
}

/// Runs one suite, records its figures (or its error) and its wall time, and rewrites the
/// output files.
async fn suite(
    run: &mut Value,
    out: &Path,
    name: &str,
    figures: impl Future<Output = anyhow::Result<Value>>,
) -> anyhow::Result<()> {
    eprintln!("\nbench all: suite {name}");
    let began = Instant::now();
    let mut figures = figures.await.unwrap_or_else(|err| {
        eprintln!("bench all: suite {name} failed: {err:#}");
        json!({"suite": name, "error": format!("{err:#}")})
    });
    figures["wall_s"] = json!(round3(began.elapsed().as_secs_f64()));
    run["suites"][name] = figures;
    write(run, out)
}

fn write(run: &Value, out: &Path) -> anyhow::Result<()> {
    std::fs::write(out.join("bench.json"), serde_json::to_string_pretty(run)?)?;
    std::fs::write(out.join("report.html"), html::render(run)?)?;
    Ok(())
}

fn print_ratios(run: &Value) {
    let mut rows = Vec::new();
    for (_, figures) in run["suites"].as_object().into_iter().flatten() {
        for r in figures["ratios"].as_array().into_iter().flatten() {
            let text = |key: &str| r[key].as_str().unwrap_or("").to_owned();
            rows.push(vec![
                text("measure"),
                text("method"),
                text("baseline"),
                r["value"].as_f64().map_or("-".into(), format_ratio),
            ]);
        }
    }
    table(
        "bench all: every ratio (method / baseline)",
        &["measure", "method", "baseline", "ratio"],
        &rows,
    );
}
