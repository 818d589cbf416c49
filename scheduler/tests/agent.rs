//! The worker's pull loop and the HTTP client against a small fake scheduler service (axum on
//! port 0): capacity per template, results delivered exactly once through a refused upload,
//! re-registration after a 404, a graceful stop that leaves; and the results stream resuming.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::value::RawValue;
use shardbox_proto::service::{
    ApiError, Heartbeat, LeaseRequest, Leased, LeasedJob, RegisterWorker, Registered,
    ResultsAccepted, ResultsRequest,
};
use shardbox_proto::{JobResult, Status};
use shardbox_scheduler::agent::SimulatedExecutor;
use shardbox_scheduler::{run_agent, AgentOptions, ApiClient, ClientError, Executor, Stop};

const WORKER_TOKEN: &str = "w-secret";
const BATCH: u64 = 9;

/// What the fake scheduler saw and holds.
#[derive(Default)]
struct Fake {
    capacity: BTreeMap<String, u32>,
    queues: Mutex<BTreeMap<String, VecDeque<u64>>>,
    known: Mutex<Vec<String>>,
    registrations: AtomicU32,
    /// Result lines received, by line, with how many times each came.
    results: Mutex<HashMap<u64, (u32, JobResult)>>,
    results_posts: AtomicU32,
    /// Refuse this many results posts with 503 first.
    refuse_results: AtomicU32,
    /// Answer this many heartbeats with 404 (forgetting the worker, as after a restart).
    forget_on_heartbeat: AtomicU32,
    heartbeats: AtomicU32,
    /// Lease requests that wanted more than the capacity of a template.
    over_asks: Mutex<Vec<String>>,
    left: Mutex<Vec<String>>,
    lease_404s: AtomicU32,
}

fn job_template(line: u64) -> &'static str {
    if line.is_multiple_of(3) {
        "exec"
    } else {
        "python"
    }
}

fn error(status: StatusCode, text: &str, retry_after_ms: Option<u64>) -> Response {
    let body = ApiError {
        error: text.into(),
        batch: None,
        accepted: None,
        retry_after_ms,
    };
    (status, Json(body)).into_response()
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {WORKER_TOKEN}"))
}

async fn register(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(request): Json<RegisterWorker>,
) -> Response {
    if !authorized(&headers) {
        return error(StatusCode::UNAUTHORIZED, "bad token", None);
    }
    assert_eq!(request.templates, fake.capacity);
    let n = fake.registrations.fetch_add(1, Ordering::SeqCst) + 1;
    let id = format!("w{n}");
    fake.known.lock().push(id.clone());
    Json(Registered {
        worker: id,
        lease_ms: 10_000,
        heartbeat_ms: 30,
    })
    .into_response()
}

async fn lease(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
    Json(request): Json<LeaseRequest>,
) -> Response {
    if !fake.known.lock().contains(&id) {
        fake.lease_404s.fetch_add(1, Ordering::SeqCst);
        return error(StatusCode::NOT_FOUND, "unknown worker", None);
    }
    let mut jobs = Vec::new();
    {
        let mut queues = fake.queues.lock();
        for (template, want) in &request.want {
            if *want > fake.capacity[template] || *want == 0 {
                fake.over_asks.lock().push(format!("{template}={want}"));
            }
            let queue = queues.entry(template.clone()).or_default();
            for _ in 0..*want {
                let Some(line) = queue.pop_front() else { break };
                let job = format!(r#"{{"id":"job-{line}","labels":{{"n":{line}}}}}"#);
                jobs.push(LeasedJob {
                    batch: BATCH,
                    line,
                    template: template.clone(),
                    attempt: 1,
                    queued_ms: 3,
                    job: RawValue::from_string(job).unwrap(),
                });
            }
        }
    }
    if jobs.is_empty() {
        // Long poll: nothing more will come, so wait (a little) and answer empty.
        tokio::time::sleep(Duration::from_millis(request.wait_ms.min(50))).await;
    }
    Json(Leased { jobs }).into_response()
}

async fn results(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(request): Json<ResultsRequest>,
) -> Response {
    assert!(authorized(&headers));
    fake.results_posts.fetch_add(1, Ordering::SeqCst);
    let refuse = fake
        .refuse_results
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if refuse {
        return error(StatusCode::SERVICE_UNAVAILABLE, "busy", Some(5));
    }
    let mut accepted = ResultsAccepted::default();
    let mut stored = fake.results.lock();
    for finished in request.results {
        assert_eq!(finished.batch, BATCH);
        let result: JobResult = serde_json::from_str(finished.result.get()).unwrap();
        let entry = stored.entry(finished.line).or_insert((0, result));
        entry.0 += 1;
        if entry.0 == 1 {
            accepted.recorded += 1;
        } else {
            accepted.duplicates += 1;
        }
    }
    Json(accepted).into_response()
}

async fn heartbeat(State(fake): State<Arc<Fake>>, Path(id): Path<String>) -> Response {
    fake.heartbeats.fetch_add(1, Ordering::SeqCst);
    let forget = fake
        .forget_on_heartbeat
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if forget {
        fake.known.lock().clear();
    }
    if !fake.known.lock().contains(&id) {
        return error(StatusCode::NOT_FOUND, "unknown worker", None);
    }
    Json(Heartbeat { leased: 0 }).into_response()
}

async fn leave(State(fake): State<Arc<Fake>>, Path(id): Path<String>) -> StatusCode {
    fake.left.lock().push(id);
    StatusCode::NO_CONTENT
}

async fn serve(fake: Arc<Fake>) -> String {
    let app = Router::new()
        .route("/v1/workers", post(register))
        .route("/v1/workers/{id}/lease", post(lease))
        .route("/v1/workers/{id}/results", post(results))
        .route("/v1/workers/{id}/heartbeat", post(heartbeat))
        .route("/v1/workers/{id}", delete(leave))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// The simulated executor, counting the jobs running at once per template.
struct Counting {
    inner: SimulatedExecutor,
    running: Mutex<BTreeMap<String, u32>>,
    most: Mutex<BTreeMap<String, u32>>,
    executed: AtomicU64,
    shut_down: AtomicU32,
}

impl Executor for Counting {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn templates(&self) -> BTreeMap<String, u32> {
        self.inner.templates()
    }

    async fn execute(&self, job: LeasedJob) -> JobResult {
        let template = job.template.clone();
        {
            let mut running = self.running.lock();
            let now = running.entry(template.clone()).or_default();
            *now += 1;
            let mut most = self.most.lock();
            let most = most.entry(template.clone()).or_default();
            *most = (*most).max(*now);
        }
        let result = self.inner.execute(job).await;
        *self.running.lock().get_mut(&template).unwrap() -= 1;
        self.executed.fetch_add(1, Ordering::SeqCst);
        result
    }

    async fn shutdown(&self) {
        self.shut_down.fetch_add(1, Ordering::SeqCst);
    }
}

fn fast_options() -> AgentOptions {
    AgentOptions {
        lease_wait: Duration::from_millis(200),
        flush_interval: Duration::from_millis(20),
        flush_max: 16,
        backoff_min: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_result_arrives_once_within_capacity_through_refusals_and_a_restart() {
    const JOBS: u64 = 300;
    let capacity = BTreeMap::from([("exec".to_owned(), 2), ("python".to_owned(), 5)]);
    let mut queues: BTreeMap<String, VecDeque<u64>> = BTreeMap::new();
    for line in 1..=JOBS {
        queues
            .entry(job_template(line).into())
            .or_default()
            .push_back(line);
    }
    let fake = Arc::new(Fake {
        capacity: capacity.clone(),
        queues: Mutex::new(queues),
        refuse_results: AtomicU32::new(2),
        forget_on_heartbeat: AtomicU32::new(1),
        ..Fake::default()
    });
    let base = serve(Arc::clone(&fake)).await;
    let executor = Arc::new(Counting {
        inner: SimulatedExecutor::new("simulated-7", capacity.clone(), Duration::from_millis(2)),
        running: Mutex::default(),
        most: Mutex::default(),
        executed: AtomicU64::new(0),
        shut_down: AtomicU32::new(0),
    });
    let stop = Stop::new();
    let client = ApiClient::new(&base, WORKER_TOKEN).unwrap();
    let agent = tokio::spawn(run_agent(
        client,
        Arc::clone(&executor),
        fast_options(),
        stop.clone(),
    ));

    // Wait for every result and for the registration after the 404, then stop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fake.results.lock().len() < JOBS as usize || fake.registrations.load(Ordering::SeqCst) < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "results did not all arrive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.drain();
    let report = tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("the agent stops")
        .unwrap()
        .expect("the agent ends well");

    let results = fake.results.lock();
    assert_eq!(results.len(), JOBS as usize);
    for line in 1..=JOBS {
        let (count, result) = &results[&line];
        assert_eq!(*count, 1, "line {line} arrived {count} times");
        assert_eq!(result.id, format!("job-{line}"));
        assert_eq!(result.status, Status::Ok);
        assert_eq!(result.worker, "simulated-7");
        assert_eq!(result.line, Some(line));
        assert_eq!(result.attempts, 1);
        assert_eq!(result.timing.queue_ms, 3);
        assert_eq!(result.labels["n"], line);
    }
    assert_eq!(executor.executed.load(Ordering::SeqCst), JOBS);
    let most = executor.most.lock().clone();
    assert!(most["python"] <= 5 && most["exec"] <= 2, "{most:?}");
    // Pulled as capacity frees up, the templates were filled.
    assert!(most["python"] >= 2, "{most:?}");
    assert!(
        fake.over_asks.lock().is_empty(),
        "{:?}",
        fake.over_asks.lock()
    );
    // Two refused posts, then the rest: nothing lost, nothing counted twice.
    assert!(fake.results_posts.load(Ordering::SeqCst) >= 3);
    assert_eq!(fake.refuse_results.load(Ordering::SeqCst), 0);
    // The heartbeat's 404 made the worker register again, under a new id it then left.
    assert_eq!(fake.forget_on_heartbeat.load(Ordering::SeqCst), 0);
    assert_eq!(fake.registrations.load(Ordering::SeqCst), 2);
    assert_eq!(report.registrations, 2);
    assert_eq!(*fake.left.lock(), vec!["w2".to_owned()]);
    assert_eq!(report.leased, JOBS);
    assert_eq!(report.sent, JOBS);
    assert_eq!(report.dropped, 0);
    assert_eq!(executor.shut_down.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_wrong_token_ends_the_agent_with_the_schedulers_words() {
    let fake = Arc::new(Fake {
        capacity: BTreeMap::from([("python".to_owned(), 1)]),
        ..Fake::default()
    });
    let base = serve(Arc::clone(&fake)).await;
    let executor = Arc::new(SimulatedExecutor::new(
        "simulated-1",
        fake.capacity.clone(),
        Duration::ZERO,
    ));
    let client = ApiClient::new(&base, "wrong").unwrap();
    let err = run_agent(client, executor, fast_options(), Stop::new())
        .await
        .unwrap_err();
    let shardbox_scheduler::AgentError::Register { source, .. } = err else {
        panic!("{err:?}");
    };
    assert_eq!(source.status(), Some(StatusCode::UNAUTHORIZED));
    assert!(!source.is_retryable());
    assert!(source.to_string().ends_with(": bad token"), "{source}");
}

#[tokio::test]
async fn a_stop_while_the_scheduler_is_down_ends_registration_at_once() {
    // Nothing listens on this port (bound, then closed).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let executor = Arc::new(SimulatedExecutor::new(
        "simulated-2",
        BTreeMap::from([("python".to_owned(), 1)]),
        Duration::ZERO,
    ));
    let stop = Stop::new();
    let client = ApiClient::new(&format!("http://{addr}"), WORKER_TOKEN).unwrap();
    let agent = tokio::spawn(run_agent(client, executor, fast_options(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !agent.is_finished(),
        "keeps retrying while the scheduler is down"
    );
    stop.drain();
    let report = tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.registrations, 0);
}

#[derive(serde::Deserialize)]
struct ResultsQuery {
    offset: u64,
    follow: bool,
}

/// Serves 10 result lines; the first answer breaks off after line 4 and half of line 5.
async fn result_lines(
    State(calls): State<Arc<Mutex<Vec<u64>>>>,
    Path(batch): Path<u64>,
    Query(query): Query<ResultsQuery>,
) -> Response {
    assert_eq!(batch, 3);
    assert!(query.follow);
    let first = {
        let mut calls = calls.lock();
        calls.push(query.offset);
        calls.len() == 1
    };
    let lines: Vec<String> = (query.offset..10)
        .map(|n| format!("{{\"n\":{n}}}\n"))
        .collect();
    let body = if first {
        let mut text = lines[..4].concat();
        text.push_str(&lines[4][..3]);
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
            Ok(text.into()),
            Err(std::io::Error::other("connection lost")),
        ];
        // The break comes a moment after the first chunk, once the headers are out.
        let chunks = futures_util::stream::iter(chunks).then(|chunk| async move {
            if chunk.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            chunk
        });
        axum::body::Body::from_stream(chunks)
    } else {
        // Blank lines and a last line without its newline are fine.
        let mut text = lines.concat().replacen('\n', "\n\n", 1);
        text.pop();
        axum::body::Body::from(text)
    };
    ([("content-type", "application/x-ndjson")], body).into_response()
}

#[tokio::test]
async fn result_lines_resume_after_a_broken_stream() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .route("/v1/batches/{id}/results", get(result_lines))
        .with_state(Arc::clone(&calls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = ApiClient::new(&format!("http://{addr}/"), "c").unwrap();

    let mut got = Vec::new();
    let mut broke = 0;
    while got.len() < 10 {
        let mut lines = client.results(3, got.len() as u64, true).await.unwrap();
        while let Some(line) = lines.next().await {
            match line {
                Ok(line) => got.push(String::from_utf8(line.to_vec()).unwrap()),
                Err(err) => {
                    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
                    assert!(err.is_retryable());
                    broke += 1;
                }
            }
        }
    }
    assert_eq!(broke, 1);
    assert_eq!(*calls.lock(), vec![0, 4]);
    let expected: Vec<String> = (0..10).map(|n| format!("{{\"n\":{n}}}")).collect();
    assert_eq!(got, expected);
}

/// The `shardbox` binary with logging quiet.
fn shardbox() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardbox"));
    command
        .env_remove("SHARDBOX_LOG")
        .env_remove("SHARDBOX_CLIENT_TOKEN")
        .env_remove("SHARDBOX_WORKER_TOKEN")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shardbox_worker_with_the_simulated_executor_serves_until_sigint_then_leaves() {
    const JOBS: u64 = 40;
    let capacity = BTreeMap::from([("python".to_owned(), 3)]);
    let fake = Arc::new(Fake {
        capacity: capacity.clone(),
        queues: Mutex::new(BTreeMap::from([(
            "python".to_owned(),
            (1..=JOBS).collect(),
        )])),
        ..Fake::default()
    });
    let base = serve(Arc::clone(&fake)).await;
    let child = shardbox()
        .args([
            "worker",
            "--simulated-executor",
            "--templates",
            "python=3",
            "--job-ms",
            "1",
        ])
        .args(["--scheduler", &base])
        .env("SHARDBOX_WORKER_TOKEN", WORKER_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fake.results.lock().len() < JOBS as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "results did not all arrive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the worker stops after SIGINT")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("simulated executor: it runs no code"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{JOBS} jobs leased, {JOBS} results sent")),
        "{stderr}"
    );
    assert_eq!(*fake.left.lock(), vec!["w1".to_owned()]);
    let results = fake.results.lock();
    for line in 1..=JOBS {
        let (count, result) = &results[&line];
        assert_eq!(*count, 1);
        assert_eq!(result.status, Status::Ok);
        assert!(result.worker.starts_with("simulated-"), "{}", result.worker);
    }
}

/// A fake of the batch side of the service: one batch, its results served in two goes.
#[derive(Default)]
struct FakeBatches {
    body: Mutex<Vec<u8>>,
    query: Mutex<String>,
    results_offsets: Mutex<Vec<u64>>,
}

const CLIENT_TOKEN: &str = "c-secret";

fn result_line(n: u64) -> String {
    let mut result = JobResult::without_run(format!("job-{n}"), Status::Ok, "");
    result.error = None;
    result.attempts = 1;
    if n == 2 {
        result.status = Status::Failed;
    }
    serde_json::to_string(&result).unwrap() + "\n"
}

async fn submit_batch(
    State(fake): State<Arc<FakeBatches>>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    body: axum::body::Body,
) -> Response {
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {CLIENT_TOKEN}"))
    {
        return error(StatusCode::UNAUTHORIZED, "bad token", None);
    }
    assert_eq!(
        headers.get("content-type").unwrap().to_str().unwrap(),
        "application/x-ndjson"
    );
    *fake.query.lock() = query.unwrap_or_default();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        fake.body.lock().extend_from_slice(&chunk.unwrap());
    }
    let lines = fake
        .body
        .lock()
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count() as u64;
    let accepted = shardbox_proto::service::BatchAccepted {
        batch: 5,
        lines,
        accepted: lines,
        invalid: 0,
    };
    (StatusCode::CREATED, Json(accepted)).into_response()
}

async fn batch_status(State(fake): State<Arc<FakeBatches>>, Path(id): Path<u64>) -> Response {
    assert_eq!(id, 5);
    let calls = fake.results_offsets.lock().len();
    let status = shardbox_proto::service::BatchStatus {
        batch: 5,
        name: "b.jsonl".into(),
        priority: 3,
        // Done once the results were asked for twice (the first stream breaks).
        state: if calls >= 2 {
            shardbox_proto::service::BatchState::Done
        } else {
            shardbox_proto::service::BatchState::Running
        },
        cancelled: false,
        truncated: false,
        lines: 6,
        accepted: 6,
        invalid: 0,
        results: if calls >= 2 { 6 } else { 0 },
        queued: 0,
        leased: 0,
        statuses: BTreeMap::new(),
        created_ms: 0,
    };
    Json(status).into_response()
}

async fn batch_results(
    State(fake): State<Arc<FakeBatches>>,
    Path(id): Path<u64>,
    Query(query): Query<ResultsQuery>,
) -> Response {
    assert_eq!(id, 5);
    assert!(query.follow);
    let first = {
        let mut offsets = fake.results_offsets.lock();
        offsets.push(query.offset);
        offsets.len() == 1
    };
    let text: String = (query.offset + 1..=6).map(result_line).collect();
    let body = if first {
        // Three lines, then the connection breaks.
        let cut = (1..=3).map(result_line).collect::<String>();
        let chunks = vec![
            Ok(bytes::Bytes::from(cut)),
            Err(std::io::Error::other("lost")),
        ];
        let chunks = futures_util::stream::iter(chunks).then(|chunk| async move {
            if chunk.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            chunk
        });
        axum::body::Body::from_stream(chunks)
    } else {
        axum::body::Body::from(text)
    };
    ([("content-type", "application/x-ndjson")], body).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shardbox_submit_wait_streams_the_batch_and_resumes_the_results() {
    let fake = Arc::new(FakeBatches::default());
    let app = Router::new()
        .route("/v1/batches", post(submit_batch))
        .route("/v1/batches/{id}", get(batch_status))
        .route("/v1/batches/{id}/results", get(batch_results))
        .with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("b.jsonl");
    let jobs: String = (1..=6)
        .map(|n| format!("{{\"id\":\"job-{n}\",\"code\":\"print({n})\"}}\n"))
        .collect();
    std::fs::write(&batch, &jobs).unwrap();
    let out = dir.path().join("results.jsonl");
    let output = shardbox()
        .arg("submit")
        .arg(&batch)
        .args(["--scheduler", &format!("http://{addr}")])
        .args(["--priority", "3", "--wait", "--out"])
        .arg(&out)
        .env("SHARDBOX_CLIENT_TOKEN", CLIENT_TOKEN)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(*fake.body.lock(), jobs.as_bytes());
    assert_eq!(*fake.query.lock(), "name=b.jsonl&priority=3");
    assert!(
        stdout.starts_with(r#"{"batch":5,"lines":6,"accepted":6,"invalid":0}"#),
        "{stdout}"
    );
    assert!(stdout.contains("status: ok 5, failed 1\n"), "{stdout}");
    assert_eq!(*fake.results_offsets.lock(), vec![0, 3]);
    let written = std::fs::read_to_string(&out).unwrap();
    let expected: String = (1..=6).map(result_line).collect();
    assert_eq!(written, expected);

    // No token: a usage error before anything is sent.
    let output = shardbox()
        .arg("submit")
        .arg(&batch)
        .args(["--scheduler", &format!("http://{addr}")])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    // A wrong token: the scheduler's refusal, as a usage error.
    let output = shardbox()
        .arg("submit")
        .arg(&batch)
        .args(["--scheduler", &format!("http://{addr}"), "--token", "nope"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(stderr.contains("bad token"), "{stderr}");
}
