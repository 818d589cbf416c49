//! The `throughput` suite: fresh sandboxes per second, one job each, through shardbox's warm
//! pool, against the ceiling of this machine: a bare loop of restores of the same checkpoint
//! with nothing else (no cgroups of shardbox's, no pool, no result handling), at the same
//! concurrency as the pool's refill.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use shardbox_proto::{Job, Status};
use shardbox_worker::{Worker, WorkerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::report::{remove_bare_cgroup_parent, table, warm_pool, BARE_CGROUP_PARENT};

/// Options of the suite.
#[derive(clap::Args)]
pub struct Args {
    /// Template to measure.
    #[arg(long, default_value = "python")]
    template: String,
    /// Jobs through shardbox (after the ones served by the pre-filled pool).
    #[arg(long, default_value_t = 60)]
    jobs: usize,
    /// Restores in the bare loop.
    #[arg(long, default_value_t = 60)]
    restores: usize,
}

const CODE: &str = "print(sum(range(1000)))";

/// Runs the suite.
///
/// # Errors
/// When the worker cannot start or a job does not come back `ok`.
pub async fn run(config: WorkerConfig, args: Args) -> anyhow::Result<serde_json::Value> {
    let worker = Arc::new(Worker::start(&config).await?);
    let pool = warm_pool(&worker, &args.template).await?;
    let concurrency = pool.template().config.pool.max_in_flight;

    // Bare ceiling first, while the pool sits idle (it does not refill while nothing is taken).
    let bare = bare_restores(&worker, &args, concurrency).await?;

    // shardbox: all jobs at once; the rate counts from the job that found the pre-filled pool
    // empty, so it measures refilling, not the head start.
    let head_start = pool.idle();
    let total = args.jobs + head_start;
    let began = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        let worker = Arc::clone(&worker);
        let template = args.template.clone();
        tasks.push(tokio::spawn(async move {
            let job = Job {
                id: format!("tp-{i}"),
                template: Some(template),
                code: Some(CODE.into()),
                ..Job::default()
            };
            let prepared = worker.prepare(job).map_err(anyhow::Error::msg)?;
            let sandbox = worker.acquire(&prepared.template).await?;
            let result = worker.run(sandbox, &prepared, Instant::now()).await;
            anyhow::ensure!(result.status == Status::Ok, "job failed: {result:?}");
            Ok(began.elapsed())
        }));
    }
    let mut done = Vec::new();
    for task in tasks {
        done.push(task.await??);
    }
    done.sort();
    let window = done[total - 1] - done[head_start.min(total - 1)];
    let shardbox_rate = args.jobs as f64 / window.as_secs_f64();
    worker.shutdown().await;

    let ratio = shardbox_rate / bare;
    table(
        "throughput: fresh sandboxes per second, one trivial job each",
        &["method", "per second", "ratio to bare"],
        &[
            vec!["bare restore loop".into(), format!("{bare:.2}"), "1".into()],
            vec![
                "shardbox warm pool".into(),
                format!("{shardbox_rate:.2}"),
                format!("{ratio:.2}"),
            ],
        ],
    );
    Ok(json!({
        "suite": "throughput",
        "template": args.template,
        "runsc": worker.runsc_version(),
        "concurrency": concurrency,
        "bare_restores_per_s": bare,
        "shardbox_jobs_per_s": shardbox_rate,
        "ratio_to_bare": ratio,
        "goal": {"ratio_at_least": 0.9, "met": ratio >= 0.9},
    }))
}

/// Restores the template's checkpoint `args.restores` times, `concurrency` at a time, each
/// answering one trivial job; returns restores per second.
async fn bare_restores(worker: &Worker, args: &Args, concurrency: usize) -> anyhow::Result<f64> {
    let pool = &worker.pools()[&args.template];
    let template = Arc::clone(pool.template());
    let dir = template.state_dir().join("bench-bare");
    let envelope = serde_json::to_vec(&json!({"code": CODE, "workdir": template.config.workdir}))?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let began = Instant::now();
    let mut lanes = Vec::new();
    for _ in 0..concurrency {
        let (template, dir, envelope, next) = (
            Arc::clone(&template),
            dir.clone(),
            envelope.clone(),
            Arc::clone(&next),
        );
        let runsc = worker.runsc().clone();
        let count = args.restores;
        lanes.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(());
                }
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
                anyhow::ensure!(
                    status.success() && out.ends_with("499500\n"),
                    "bare restore {id} failed: {status} {out:?}"
                );
                let _ = std::fs::remove_dir_all(&bundle);
            }
        }));
    }
    for lane in lanes {
        lane.await??;
    }
    remove_bare_cgroup_parent();
    Ok(args.restores as f64 / began.elapsed().as_secs_f64())
}
