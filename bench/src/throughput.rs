//! The `throughput` suite: fresh sandboxes per second, one job each, for a light template
//! (`python`) and a heavy one whose warm-up imports numpy (`python-sci`), each through:
//!
//! - *shardbox*: the template's warm pool, all jobs submitted at once; the rate counts from the
//!   job that found the pre-filled pool empty, so it measures refilling, not the head start;
//! - *bare restore loop* (the ceiling of sandbox isolation here): restores of the same
//!   checkpoint answering one job each, with nothing else (no cgroups of shardbox's, no pool, no
//!   result handling), at the pool's refill concurrency;
//! - *`runsc run` per job*: the usual sandboxed way, a cold boot of the template's rootfs running
//!   `python3 -c CODE`, at the same concurrency;
//! - *host `python3 -c` per job*: the usual unsandboxed way, the same interpreter and packages
//!   (the template's rootfs, entered with `chroot`) on the host kernel, one per core at a time.
//!
//! The heavy template's job imports numpy itself, as a job would: free in a warm sandbox, paid
//! in full by every cold one. Process isolation against its own ceiling is the `process` suite.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shardbox_proto::{Job, Status};
use shardbox_worker::config::Isolation;
use shardbox_worker::{Worker, WorkerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::report::{
    host_python, only_templates, quantile, ratio, remove_bare_cgroup_parent, round3, rounded,
    table, warm_pool, PoolSampler, BARE_CGROUP_PARENT,
};

/// Options of the suite.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Templates to measure, comma-separated; a template whose rootfs is missing is skipped
    /// with a note (`scripts/setup.sh --sci` builds the heavy one's).
    #[arg(long, value_delimiter = ',', default_value = "python,python-sci")]
    pub templates: Vec<String>,
    /// Jobs through shardbox (after the ones served by the pre-filled pool).
    #[arg(long, default_value_t = 30)]
    pub jobs: usize,
    /// Restores in the bare loop.
    #[arg(long, default_value_t = 30)]
    pub restores: usize,
    /// Jobs run by a `runsc run` each.
    #[arg(long, default_value_t = 12)]
    pub cold_jobs: usize,
    /// Jobs run by a host `python3 -c` each.
    #[arg(long, default_value_t = 60)]
    pub host_jobs: usize,
}

/// The job of a template and what it prints.
#[derive(Clone, Copy)]
struct Work {
    code: &'static str,
    expect: &'static str,
}

const EXPECT: &str = "499500\n";

fn work_for(preload: &[String]) -> Work {
    if preload.iter().any(|m| m == "numpy") {
        Work {
            code: "import numpy as np\nprint(int(np.arange(1000).sum()))",
            expect: EXPECT,
        }
    } else {
        Work {
            code: "print(sum(range(1000)))",
            expect: EXPECT,
        }
    }
}

/// One method's figures: jobs, jobs per second, and each job's wall time in milliseconds.
struct Measured {
    jobs: usize,
    per_s: f64,
    job_ms: Vec<f64>,
}

/// Runs the suite.
///
/// # Errors
/// When a worker cannot start or a job does not come back right.
pub async fn run(config: WorkerConfig, args: Args) -> anyhow::Result<serde_json::Value> {
    let mut templates = Vec::new();
    let mut ratios = Vec::new();
    let mut rows = Vec::new();
    for name in &args.templates {
        let Some(template) = config.templates.get(name) else {
            anyhow::bail!("the configuration declares no template {name:?}");
        };
        anyhow::ensure!(
            template.isolation == Isolation::Sandbox,
            "template {name:?} is not in sandbox isolation; the process suite measures that level"
        );
        if !template.rootfs.is_dir() {
            let note = format!(
                "skipped: no rootfs at {} (scripts/setup.sh --sci builds it)",
                template.rootfs.display()
            );
            eprintln!("throughput: template {name}: {note}");
            templates.push(json!({"template": name, "skipped": note}));
            continue;
        }
        let figures = one_template(&config, name, &args).await?;
        let (value, r, table_rows) = figures;
        templates.push(value);
        ratios.extend(r);
        rows.extend(table_rows);
    }
    table(
        "throughput: fresh sandboxes per second, one job each",
        &[
            "template",
            "method",
            "jobs",
            "per second",
            "vs bare restore",
        ],
        &rows,
    );
    Ok(json!({
        "suite": "throughput",
        "templates": templates,
        "ratios": ratios,
    }))
}

type TemplateFigures = (serde_json::Value, Vec<serde_json::Value>, Vec<Vec<String>>);

async fn one_template(
    config: &WorkerConfig,
    name: &str,
    args: &Args,
) -> anyhow::Result<TemplateFigures> {
    let worker = Arc::new(Worker::start(&only_templates(config, &[name])?).await?);
    let outcome = measure_template(&worker, name, args).await;
    worker.shutdown().await;
    remove_bare_cgroup_parent();
    outcome
}

async fn measure_template(
    worker: &Arc<Worker>,
    name: &str,
    args: &Args,
) -> anyhow::Result<TemplateFigures> {
    let pool = warm_pool(worker, name).await?;
    let template = Arc::clone(pool.template());
    let concurrency = template.config.pool.max_in_flight;
    let work = work_for(&template.config.preload);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());

    // Baselines first, while the pool sits full (it does not refill while nothing is taken).
    let bare = bare_restores(worker, name, &work, args.restores, concurrency).await?;
    let cold = cold_runs(worker, name, &work, args.cold_jobs, concurrency).await?;
    let host = host_runs(&template.config.rootfs, &work, args.host_jobs, cores).await?;

    let sampler = PoolSampler::start(worker, &[name], Duration::from_millis(100));
    let head_start = pool.idle();
    let total = args.jobs + head_start;
    let began = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        let worker = Arc::clone(worker);
        let template = name.to_owned();
        tasks.push(tokio::spawn(async move {
            let job = Job {
                id: format!("tp-{i}"),
                template: Some(template),
                code: Some(work.code.into()),
                ..Job::default()
            };
            let prepared = worker.prepare(job).map_err(anyhow::Error::msg)?;
            let sandbox = worker.acquire(&prepared.template).await?;
            let result = worker.run(sandbox, &prepared, Instant::now()).await;
            anyhow::ensure!(
                result.status == Status::Ok && result.stdout == work.expect,
                "job failed: {result:?}"
            );
            let job_ms = result.timing.start_us as f64 / 1e3 + result.timing.run_ms as f64;
            Ok((began.elapsed(), job_ms))
        }));
    }
    let mut done = Vec::new();
    let mut job_ms = Vec::new();
    for task in tasks {
        let (at, ms) = task.await??;
        done.push(at);
        job_ms.push(ms);
    }
    let pool_idle = sampler.finish().await;
    done.sort();
    let window = done[total - 1] - done[head_start.min(total - 1)];
    let shardbox = Measured {
        jobs: args.jobs,
        per_s: args.jobs as f64 / window.as_secs_f64(),
        job_ms,
    };

    let methods = [
        ("bare restore loop", &bare),
        ("shardbox warm pool", &shardbox),
        ("runsc run per job", &cold),
        ("host python3 -c per job", &host),
    ];
    let rows = methods
        .iter()
        .map(|(method, m)| {
            vec![
                name.to_owned(),
                (*method).to_owned(),
                m.jobs.to_string(),
                format!("{:.2}", m.per_s),
                format!("{:.2}", m.per_s / bare.per_s),
            ]
        })
        .collect();
    let measure = format!("{name}: jobs per second (higher is better)");
    let ratios = vec![
        ratio(
            &measure,
            "shardbox warm pool",
            "bare restore loop",
            shardbox.per_s / bare.per_s,
        ),
        ratio(
            &measure,
            "shardbox warm pool",
            "runsc run per job",
            shardbox.per_s / cold.per_s,
        ),
        ratio(
            &measure,
            "shardbox warm pool",
            "host python3 -c per job",
            shardbox.per_s / host.per_s,
        ),
        ratio(
            &measure,
            "bare restore loop",
            "runsc run per job",
            bare.per_s / cold.per_s,
        ),
    ];
    let method_json = |m: &Measured| {
        json!({
            "jobs": m.jobs,
            "per_s": m.per_s,
            "job_ms_p50": quantile(&m.job_ms, 0.5),
            "job_ms_p99": quantile(&m.job_ms, 0.99),
            "job_ms": rounded(&m.job_ms),
        })
    };
    let value = json!({
        "template": name,
        "job_code": work.code,
        "runsc": worker.runsc_version(),
        "concurrency": concurrency,
        "host_lanes": cores,
        "build": template.report,
        "methods": {
            "bare restore loop": method_json(&bare),
            "shardbox warm pool": method_json(&shardbox),
            "runsc run per job": method_json(&cold),
            "host python3 -c per job": method_json(&host),
        },
        "shardbox_head_start": head_start,
        "shardbox_done_s": done.iter().map(|d| round3(d.as_secs_f64())).collect::<Vec<_>>(),
        "pool_idle": pool_idle,
        "restore_beats_cold": bare.per_s > cold.per_s,
        "goal": {"ratio_to_bare_at_least": 0.9, "met": shardbox.per_s / bare.per_s >= 0.9},
    });
    Ok((value, ratios, rows))
}

/// Runs `count` numbered tasks made by `task`, `lanes` at a time; returns jobs per second and
/// each task's own wall time in milliseconds.
async fn in_lanes<F, Fut>(count: usize, lanes: usize, task: F) -> anyhow::Result<Measured>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let task = Arc::new(task);
    let next = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..lanes.max(1) {
        let (task, next) = (Arc::clone(&task), Arc::clone(&next));
        handles.push(tokio::spawn(async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(times);
                }
                let one = Instant::now();
                task(i).await?;
                times.push(one.elapsed().as_secs_f64() * 1e3);
            }
        }));
    }
    let mut job_ms = Vec::new();
    for handle in handles {
        job_ms.extend(handle.await??);
    }
    Ok(Measured {
        jobs: count,
        per_s: count as f64 / began.elapsed().as_secs_f64(),
        job_ms,
    })
}

/// Restores `template`'s checkpoint `count` times, `lanes` at a time, each answering one job.
async fn bare_restores(
    worker: &Worker,
    template: &str,
    work: &Work,
    count: usize,
    lanes: usize,
) -> anyhow::Result<Measured> {
    let template = Arc::clone(worker.pools()[template].template());
    let dir = template.state_dir().join("bench-bare");
    let envelope =
        serde_json::to_vec(&json!({"code": work.code, "workdir": template.config.workdir}))?;
    let runsc = worker.runsc().clone();
    let expect = work.expect;
    in_lanes(count, lanes, move |i| {
        let (template, dir, envelope, runsc) = (
            Arc::clone(&template),
            dir.clone(),
            envelope.clone(),
            runsc.clone(),
        );
        async move {
            let id = format!("bare-{}-{i}", std::process::id());
            let bundle = dir.join(&id);
            template
                .bundle()
                .write(&bundle, &format!("/{BARE_CGROUP_PARENT}/{id}"))?;
            let mut child = runsc
                .command()
                .arg("restore")
                .arg(format!("--bundle={}", bundle.display()))
                .arg(format!("--image-path={}", template.image().display()))
                .arg(&id)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            let mut stdin = child.stdin.take().expect("piped");
            let mut frame = format!("wake\njob {}\n", envelope.len()).into_bytes();
            frame.extend_from_slice(&envelope);
            stdin.write_all(&frame).await?;
            drop(stdin);
            let mut out = String::new();
            child
                .stdout
                .take()
                .expect("piped")
                .read_to_string(&mut out)
                .await?;
            let status = child.wait().await?;
            let _ = std::fs::remove_dir_all(&bundle);
            anyhow::ensure!(
                status.success() && out.ends_with(expect),
                "bare restore {id} failed: {status} {out:?}"
            );
            Ok(())
        }
    })
    .await
}

/// Boots `template`'s rootfs cold with `runsc run` `count` times, `lanes` at a time, each
/// running `python3 -c CODE` (no entry script, no warm-up: the job imports what it needs).
async fn cold_runs(
    worker: &Worker,
    template: &str,
    work: &Work,
    count: usize,
    lanes: usize,
) -> anyhow::Result<Measured> {
    let template = Arc::clone(worker.pools()[template].template());
    let dir = template.state_dir().join("bench-bare");
    let mut spec = template.bundle().clone();
    spec.args = vec!["python3".into(), "-c".into(), work.code.into()];
    let spec = Arc::new(spec);
    let runsc = worker.runsc().clone();
    let expect = work.expect;
    in_lanes(count, lanes, move |i| {
        let (spec, dir, runsc) = (Arc::clone(&spec), dir.clone(), runsc.clone());
        async move {
            let id = format!("cold-{}-{i}", std::process::id());
            let bundle = dir.join(&id);
            spec.write(&bundle, &format!("/{BARE_CGROUP_PARENT}/{id}"))?;
            let out = runsc
                .command()
                .arg("run")
                .arg(format!("--bundle={}", bundle.display()))
                .arg(&id)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await?;
            let _ = std::fs::remove_dir_all(&bundle);
            anyhow::ensure!(
                out.status.success() && out.stdout.ends_with(expect.as_bytes()),
                "runsc run {id} failed: {out:?}"
            );
            Ok(())
        }
    })
    .await
}

/// Runs `chroot ROOTFS python3 -c CODE` on the host `count` times, `lanes` at a time.
async fn host_runs(
    rootfs: &Path,
    work: &Work,
    count: usize,
    lanes: usize,
) -> anyhow::Result<Measured> {
    let rootfs = rootfs.to_owned();
    let (code, expect) = (work.code, work.expect);
    in_lanes(count, lanes, move |_| {
        let mut cmd = host_python(&rootfs, code);
        async move {
            let out = cmd.output().await?;
            anyhow::ensure!(
                out.status.success() && out.stdout == expect.as_bytes(),
                "host python3 failed: {out:?}"
            );
            Ok(())
        }
    })
    .await
}
