//! The HTTP API over [`Scheduler`]: routes, bearer-token checks and streaming bodies.
//! `scheduler/openapi.yaml` documents every route.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use shardbox_proto::service::{
    ApiError, BatchAccepted, Heartbeat, LeaseRequest, RegisterWorker, Registered, ResultsRequest,
};
use tokio::sync::Semaphore;

use super::core::{BatchError, LeaseError, Scheduler};
use super::store::StoreError;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Api {
    scheduler: Arc<Scheduler>,
    client_tokens: Arc<Vec<[u8; 32]>>,
    worker_tokens: Arc<Vec<[u8; 32]>>,
    metrics: Option<PrometheusHandle>,
    requests: Arc<Semaphore>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Worker,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// An error answer: a status and an [`ApiError`] body.
struct Refusal(StatusCode, ApiError);

impl Refusal {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Refusal(
            status,
            ApiError {
                error: error.into(),
                batch: None,
                accepted: None,
                retry_after_ms: None,
            },
        )
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(&self.1)).into_response();
        if let Some(ms) = self.1.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Self {
        fatal(&err);
        Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
    }
}

impl From<BatchError> for Refusal {
    fn from(err: BatchError) -> Self {
        match err {
            BatchError::Unknown(_) => Refusal::new(StatusCode::NOT_FOUND, err.to_string()),
            BatchError::Store(err) => err.into(),
        }
    }
}

impl From<LeaseError> for Refusal {
    fn from(err: LeaseError) -> Self {
        match err {
            LeaseError::UnknownWorker(_) => Refusal::new(StatusCode::NOT_FOUND, err.to_string()),
            LeaseError::Store(err) => err.into(),
        }
    }
}

/// A store failure means nothing more can be acknowledged safely: the process ends, and a
/// restart recovers from what is on disk.
fn fatal(err: &StoreError) {
    tracing::error!(error = %err, "the store failed; exiting so a restart can recover");
    eprintln!("shardbox scheduler: the store failed: {err}");
    std::process::exit(crate::exit::RUNTIME.into());
}

impl Api {
    /// The API over `scheduler`, exporting `metrics` on `/metrics` when given.
    pub fn new(scheduler: Arc<Scheduler>, metrics: Option<PrometheusHandle>) -> Self {
        let config = scheduler.config();
        Api {
            client_tokens: Arc::new(config.client_tokens.iter().map(|t| digest(t)).collect()),
            worker_tokens: Arc::new(config.worker_tokens.iter().map(|t| digest(t)).collect()),
            requests: Arc::new(Semaphore::new(config.max_requests)),
            metrics,
            scheduler,
        }
    }

    /// The routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .route("/v1/batches", post(submit).get(list_batches))
            .route("/v1/batches/{id}", get(batch_status))
            .route("/v1/batches/{id}/results", get(results))
            .route("/v1/batches/{id}/cancel", post(cancel))
            .route("/v1/workers", post(register))
            .route("/v1/workers/{id}", axum::routing::delete(leave))
            .route("/v1/workers/{id}/lease", post(lease))
            .route("/v1/workers/{id}/results", post(worker_results))
            .route("/v1/workers/{id}/heartbeat", post(heartbeat))
            .with_state(self)
    }

    /// Checks the bearer token for `role` (either role for `None`).
    fn check(&self, headers: &HeaderMap, role: Option<Role>) -> Result<(), Refusal> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Refusal::new(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
        let given = digest(token.trim());
        // Comparing digests keeps the time taken independent of how much of a token matches.
        let known = |list: &[[u8; 32]]| list.contains(&given);
        let ok = match role {
            Some(Role::Client) => known(&self.client_tokens),
            Some(Role::Worker) => known(&self.worker_tokens),
            None => known(&self.client_tokens) || known(&self.worker_tokens),
        };
        if ok {
            Ok(())
        } else {
            Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "unknown token for this route",
            ))
        }
    }

    /// A permit for a client request, or a fast refusal with a retry hint.
    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
        Arc::clone(&self.requests).try_acquire_owned().map_err(|_| {
            let mut refusal =
                Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "too many requests at once");
            refusal.1.retry_after_ms = Some(500);
            refusal
        })
    }
}

/// Parses a JSON body, after the token was checked (an extractor would parse it first).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body)
        .map_err(|err| Refusal::new(StatusCode::BAD_REQUEST, format!("bad request body: {err}")))
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn metrics(State(api): State<Api>, headers: HeaderMap) -> Result<Response, Refusal> {
    api.check(&headers, None)?;
    let queued = api.scheduler.queued();
    metrics::gauge!("shardbox_scheduler_queued_jobs").set(queued as f64);
    let text = api
        .metrics
        .as_ref()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

#[derive(Debug, Deserialize)]
struct SubmitQuery {
    #[serde(default)]
    name: String,
    #[serde(default)]
    priority: i32,
}

async fn submit(
    State(api): State<Api>,
    Query(query): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    api.check(&headers, Some(Role::Client))?;
    let _permit = api.admit()?;
    let limit = api.scheduler.config().max_batch_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("batch body larger than max_batch_bytes ({limit} bytes)"),
        ));
    }
    let mut upload = api
        .scheduler
        .begin_batch(query.name, query.priority)
        .await?;
    let max_line = api.scheduler.config().max_line_bytes;
    let mut stream = body.into_data_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut received: u64 = 0;
    let mut failure: Option<Refusal> = None;
    while let Some(chunk) = stream.next().await {
        let mut chunk = match chunk {
            Ok(chunk) => chunk,
            Err(err) => {
                failure = Some(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("the batch body broke off: {err}"),
                ));
                break;
            }
        };
        if received + chunk.len() as u64 > limit {
            // Keep the whole lines that fit under the limit, then refuse the rest.
            chunk.truncate((limit - received) as usize);
            let whole = chunk
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |cut| cut + 1);
            chunk.truncate(whole);
            failure = Some(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("batch body larger than max_batch_bytes ({limit} bytes)"),
            ));
        }
        received += chunk.len() as u64;
        let mut rest: &[u8] = &chunk;
        while let Some(cut) = rest.iter().position(|b| *b == b'\n') {
            if pending.is_empty() {
                upload.line(&rest[..cut]).await?;
            } else {
                append_capped(&mut pending, &rest[..cut], max_line);
                let line = std::mem::take(&mut pending);
                upload.line(&line).await?;
            }
            rest = &rest[cut + 1..];
        }
        append_capped(&mut pending, rest, max_line);
        if failure.is_some() {
            pending.clear();
            break;
        }
    }
    if failure.is_none() && !pending.is_empty() {
        upload.line(&pending).await?;
    }
    let (lines, accepted, invalid) = upload.counts();
    let batch = upload.finish(failure.is_some()).await?;
    tracing::info!(
        batch,
        lines,
        accepted,
        invalid,
        truncated = failure.is_some(),
        "batch stored"
    );
    if let Some(mut refusal) = failure {
        refusal.1.batch = Some(batch);
        refusal.1.accepted = Some(accepted);
        return Err(refusal);
    }
    let answer = BatchAccepted {
        batch,
        lines,
        accepted,
        invalid,
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// Appends to a partial line, keeping at most one byte past `max`: enough for the line to be
/// refused as too long without holding all of it.
fn append_capped(pending: &mut Vec<u8>, bytes: &[u8], max: usize) {
    let room = (max + 1).saturating_sub(pending.len());
    pending.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

async fn list_batches(State(api): State<Api>, headers: HeaderMap) -> Result<Response, Refusal> {
    api.check(&headers, Some(Role::Client))?;
    Ok(Json(api.scheduler.statuses()).into_response())
}

async fn batch_status(
    State(api): State<Api>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    api.check(&headers, Some(Role::Client))?;
    Ok(Json(api.scheduler.status(id)?).into_response())
}

async fn cancel(
    State(api): State<Api>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    api.check(&headers, Some(Role::Client))?;
    Ok(Json(api.scheduler.cancel(id).await?).into_response())
}

#[derive(Debug, Deserialize)]
struct ResultsQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    follow: bool,
}

/// Results read from the store per step of the stream.
const RESULTS_PER_READ: usize = 4096;

async fn results(
    State(api): State<Api>,
    Path(id): Path<u64>,
    Query(query): Query<ResultsQuery>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    api.check(&headers, Some(Role::Client))?;
    let batch = api.scheduler.batch(id).ok_or(BatchError::Unknown(id))?;
    let store = api.scheduler.store().clone();
    let follow = query.follow;
    let state = (query.offset, false, batch.results.subscribe());
    let stream = futures_util::stream::unfold(state, move |(offset, finished, mut published)| {
        let store = store.clone();
        let batch = Arc::clone(&batch);
        async move {
            if finished {
                return None;
            }
            loop {
                // Mark the current count seen before reading, so a commit after the read wakes
                // the wait below.
                let stored = *published.borrow_and_update();
                if offset < stored {
                    let read = tokio::task::spawn_blocking(move || {
                        store.read_results(id, offset, RESULTS_PER_READ)
                    })
                    .await;
                    return match read {
                        Ok(Ok((bytes, count))) => Some((
                            Ok::<_, std::io::Error>(bytes),
                            (offset + count, false, published),
                        )),
                        Ok(Err(err)) => {
                            Some((Err(std::io::Error::other(err)), (offset, true, published)))
                        }
                        Err(err) => {
                            Some((Err(std::io::Error::other(err)), (offset, true, published)))
                        }
                    };
                }
                if !follow || batch.complete() {
                    return None;
                }
                let _ = tokio::time::timeout(Duration::from_secs(15), published.changed()).await;
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn register(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    api.check(&headers, Some(Role::Worker))?;
    let request: RegisterWorker = parse(&body)?;
    let entry = api.scheduler.register(request.name, request.templates);
    let lease_ms = api.scheduler.config().lease_ms;
    Ok(Json(Registered {
        worker: entry.id.clone(),
        lease_ms,
        heartbeat_ms: (lease_ms / 4).max(50),
    })
    .into_response())
}

async fn lease(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    api.check(&headers, Some(Role::Worker))?;
    let request: LeaseRequest = parse(&body)?;
    let jobs = api
        .scheduler
        .lease(&id, &request.want, Duration::from_millis(request.wait_ms))
        .await?;
    // The jobs' JSON was checked at submission; it is copied into the answer as it is.
    let mut body = Vec::with_capacity(64 + jobs.iter().map(|j| j.json.len() + 96).sum::<usize>());
    body.extend_from_slice(b"{\"jobs\":[");
    for (n, job) in jobs.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        let queued_ms = job.taken.since.elapsed().as_millis();
        let template = serde_json::to_string(&job.template).unwrap_or_default();
        body.extend_from_slice(
            format!(
                "{{\"batch\":{},\"line\":{},\"template\":{template},\"attempt\":{},\
                 \"queued_ms\":{queued_ms},\"job\":",
                job.taken.batch, job.taken.line, job.taken.attempt
            )
            .as_bytes(),
        );
        body.extend_from_slice(&job.json);
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn worker_results(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    api.check(&headers, Some(Role::Worker))?;
    let limit = api.scheduler.config().max_request_bytes;
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("results body larger than max_request_bytes ({limit} bytes); send fewer"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("results body broke off: {err}"),
            )
        })?;
        if bytes.len() + chunk.len() > limit {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    let request: ResultsRequest = parse(&bytes)?;
    let answer = api.scheduler.finish(&id, request.results).await?;
    Ok(Json(answer).into_response())
}

async fn heartbeat(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    api.check(&headers, Some(Role::Worker))?;
    let worker = api.scheduler.touch(&id)?;
    Ok(Json(Heartbeat {
        leased: api.scheduler.leased_by(&worker),
    })
    .into_response())
}

async fn leave(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    api.check(&headers, Some(Role::Worker))?;
    api.scheduler.drop_worker(&id, false).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
