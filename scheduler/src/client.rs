//! A typed client of the scheduler service's HTTP API (`proto::service` holds the wire types).
//!
//! [`ApiClient`] carries the base URL and the bearer token; the batch calls (`health`,
//! `submit*`, `batch`, `batches`, `cancel`, `results`) serve `shardbox submit`, the worker calls
//! (`register`, `lease`, `send_results`, `heartbeat`, `leave`) serve `shardbox worker`. Every
//! call fails with [`ClientError`], which tells a scheduler that cannot be reached (worth
//! retrying) from one that answered with an error, and from an answer that does not decode.
//!
//! Batch bodies are streamed from their source in chunks, and result streams are split into
//! lines as they arrive, so neither is ever held whole in memory.

use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shardbox_proto::service::{
    ApiError, BatchAccepted, BatchStatus, Heartbeat, LeaseRequest, Leased, RegisterWorker,
    Registered, ResultsAccepted, ResultsRequest,
};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Size of the chunks a batch body is read and sent in.
const CHUNK_BYTES: usize = 256 << 10;

/// Longest wait for a TCP connection to the scheduler.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for the answer to a short call (everything but uploads, result streams and the
/// long poll, which get their own).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Extra time a lease call is given beyond its long-poll wait.
const LEASE_GRACE: Duration = Duration::from_secs(30);

/// Why a call to the scheduler failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The scheduler could not be reached, or the connection broke before a full answer
    /// arrived. Worth retrying.
    #[error("cannot reach the scheduler at {url}")]
    Connect {
        /// The URL called.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The scheduler answered with an error status.
    #[error("the scheduler answered {status} to {url}: {}", body.error)]
    Status {
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The error body (made up from the status when the body was not an `ApiError`).
        body: ApiError,
    },
    /// The answer arrived but is not what the API promises.
    #[error("cannot decode the scheduler's answer to {url}")]
    Decode {
        /// The URL called.
        url: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A batch file to submit cannot be opened.
    #[error("cannot open batch file {path}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The base URL or a path built on it is not a valid URL.
    #[error("invalid scheduler URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
}

impl ClientError {
    /// Whether trying the same call again later may succeed: the scheduler was unreachable,
    /// overloaded (503) or behind a failing gateway (502, 504).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } => true,
            ClientError::Status { status, .. } => matches!(
                *status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ),
            _ => false,
        }
    }

    /// The HTTP status, when the scheduler answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the scheduler answered 404 (for worker calls: it does not know the worker).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    /// How long the scheduler asked us to wait before trying again, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { body, .. } => body.retry_after_ms.map(Duration::from_millis),
            _ => None,
        }
    }
}

/// One line of a results stream (a JSON `JobResult`), without its newline.
pub type ResultLine = Bytes;

/// A stream of result lines, ending when the scheduler ends the answer.
pub type ResultLines = Pin<Box<dyn Stream<Item = Result<ResultLine, ClientError>> + Send>>;

/// A client of one scheduler, with one bearer token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    token: String,
}

impl ApiClient {
    /// A client of the scheduler at `base` (such as `http://10.0.0.5:7070`), authenticating
    /// with `token`.
    ///
    /// # Errors
    /// [`ClientError::Url`] when `base` is not an `http` or `https` URL.
    pub fn new(base: &str, token: impl Into<String>) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::Url {
            url: base.to_owned(),
            reason,
        };
        let mut url = Url::parse(base).map_err(|err| bad(err.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the scheme must be http".into()));
        }
        if url.cannot_be_a_base() {
            return Err(bad("not a base URL".into()));
        }
        // Paths are joined onto the base, which must end in a slash to keep its own path.
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|err| bad(err.to_string()))?;
        Ok(ApiClient {
            http,
            base: url,
            token: token.into(),
        })
    }

    /// The base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> Result<Url, ClientError> {
        self.base.join(path).map_err(|err| ClientError::Url {
            url: format!("{}{path}", self.base),
            reason: err.to_string(),
        })
    }

    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.http.request(method, url).header(
            shardbox_proto::service::AUTHORIZATION,
            format!("Bearer {}", self.token),
        )
    }

    /// Sends `request` and returns the answer when its status is a success.
    async fn send(&self, url: &Url, request: RequestBuilder) -> Result<Response, ClientError> {
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?;
        let body = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| ApiError {
            error: status
                .canonical_reason()
                .unwrap_or("unexpected status")
                .to_lowercase(),
            batch: None,
            accepted: None,
            retry_after_ms: None,
        });
        Err(ClientError::Status {
            url: url.to_string(),
            status,
            body,
        })
    }

    /// Sends `request` and decodes its JSON answer.
    async fn call<T: DeserializeOwned>(
        &self,
        url: Url,
        request: RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = self.send(&url, request).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            url: url.to_string(),
            source,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.url(path)?;
        let request = self.request(Method::GET, url.clone()).timeout(CALL_TIMEOUT);
        self.call(url, request).await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let url = self.url(path)?;
        let request = self
            .request(Method::POST, url.clone())
            .timeout(timeout)
            .json(body);
        self.call(url, request).await
    }

    /// `GET /health`: whether the scheduler is up.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn health(&self) -> Result<(), ClientError> {
        let _: serde_json::Value = self.get("health").await?;
        Ok(())
    }

    /// `POST /v1/batches`: submits the batch file at `path`, streamed from disk.
    ///
    /// # Errors
    /// [`ClientError::Open`] when the file cannot be opened; otherwise as [`Self::submit`].
    pub async fn submit_file(
        &self,
        path: &Path,
        name: &str,
        priority: i32,
    ) -> Result<BatchAccepted, ClientError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| ClientError::Open {
                path: path.display().to_string(),
                source,
            })?;
        self.submit(file, name, priority).await
    }

    /// `POST /v1/batches?name=&priority=`: submits the JSONL batch read from `body`, streamed
    /// in chunks as it is read. Not retried: a broken upload may have left a truncated batch
    /// (its id is in the error body when the scheduler said so).
    ///
    /// # Errors
    /// [`ClientError`]; a read error of `body` breaks the upload and shows as
    /// [`ClientError::Connect`].
    pub async fn submit<R>(
        &self,
        body: R,
        name: &str,
        priority: i32,
    ) -> Result<BatchAccepted, ClientError>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let mut url = self.url("v1/batches")?;
        url.query_pairs_mut()
            .append_pair("name", name)
            .append_pair("priority", &priority.to_string());
        let request = self
            .request(Method::POST, url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(reqwest::Body::wrap_stream(chunks(body)));
        self.call(url, request).await
    }

    /// `GET /v1/batches/{id}`: one batch's progress.
    ///
    /// # Errors
    /// [`ClientError`]; 404 for an unknown batch.
    pub async fn batch(&self, batch: u64) -> Result<BatchStatus, ClientError> {
        self.get(&format!("v1/batches/{batch}")).await
    }

    /// `GET /v1/batches`: every batch's progress.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn batches(&self) -> Result<Vec<BatchStatus>, ClientError> {
        self.get("v1/batches").await
    }

    /// `POST /v1/batches/{id}/cancel`: cancels a batch; its jobs without results get
    /// `cancelled` ones.
    ///
    /// # Errors
    /// [`ClientError`]; 404 for an unknown batch.
    pub async fn cancel(&self, batch: u64) -> Result<BatchStatus, ClientError> {
        self.post(&format!("v1/batches/{batch}/cancel"), &(), CALL_TIMEOUT)
            .await
    }

    /// `GET /v1/batches/{id}/results?offset=&follow=`: the batch's result lines from the
    /// `offset`-th (0-based), in completion order. With `follow`, the stream stays open until
    /// the batch has every result. Lines come without their newline; blank lines are skipped.
    /// A line cut by a broken connection is not returned (the stream yields
    /// [`ClientError::Connect`] instead), so resuming at the number of lines received loses
    /// and repeats nothing.
    ///
    /// # Errors
    /// [`ClientError`] for the request; the stream yields [`ClientError::Connect`] when the
    /// connection breaks.
    pub async fn results(
        &self,
        batch: u64,
        offset: u64,
        follow: bool,
    ) -> Result<ResultLines, ClientError> {
        let mut url = self.url(&format!("v1/batches/{batch}/results"))?;
        url.query_pairs_mut()
            .append_pair("offset", &offset.to_string())
            .append_pair("follow", if follow { "true" } else { "false" });
        let request = self.request(Method::GET, url.clone());
        let response = self.send(&url, request).await?;
        Ok(Box::pin(split_lines(url.to_string(), response)))
    }

    /// `POST /v1/workers`: registers a worker.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn register(&self, worker: &RegisterWorker) -> Result<Registered, ClientError> {
        self.post("v1/workers", worker, CALL_TIMEOUT).await
    }

    /// `POST /v1/workers/{id}/lease`: asks for jobs, waiting up to `request.wait_ms` when none
    /// are queued.
    ///
    /// # Errors
    /// [`ClientError`]; 404 when the scheduler does not know the worker (register again).
    pub async fn lease(&self, worker: &str, request: &LeaseRequest) -> Result<Leased, ClientError> {
        let timeout = Duration::from_millis(request.wait_ms) + LEASE_GRACE;
        self.post(
            &format!("v1/workers/{}/lease", segment(worker)),
            request,
            timeout,
        )
        .await
    }

    /// `POST /v1/workers/{id}/results`: sends finished jobs. Safe to send again.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn send_results(
        &self,
        worker: &str,
        request: &ResultsRequest,
    ) -> Result<ResultsAccepted, ClientError> {
        let path = format!("v1/workers/{}/results", segment(worker));
        self.post(&path, request, CALL_TIMEOUT).await
    }

    /// `POST /v1/workers/{id}/heartbeat`: tells the scheduler the worker is alive.
    ///
    /// # Errors
    /// [`ClientError`]; 404 when the scheduler does not know the worker (register again).
    pub async fn heartbeat(&self, worker: &str) -> Result<Heartbeat, ClientError> {
        let path = format!("v1/workers/{}/heartbeat", segment(worker));
        self.post(&path, &(), CALL_TIMEOUT).await
    }

    /// `DELETE /v1/workers/{id}`: leaves; jobs still leased to the worker are queued again.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn leave(&self, worker: &str) -> Result<(), ClientError> {
        let url = self.url(&format!("v1/workers/{}", segment(worker)))?;
        let request = self
            .request(Method::DELETE, url.clone())
            .timeout(CALL_TIMEOUT);
        self.send(&url, request).await?;
        Ok(())
    }
}

/// A worker id as one URL path segment (ids are the scheduler's; this only guards against a
/// slash or a `?` in one).
fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The bytes of `reader` as a stream of chunks of up to [`CHUNK_BYTES`].
fn chunks<R>(reader: R) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static
where
    R: AsyncRead + Send + Unpin + 'static,
{
    futures_util::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let mut buf = BytesMut::with_capacity(CHUNK_BYTES);
        match reader.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(buf.freeze()), Some(reader))),
            Err(err) => Some((Err(err), None)),
        }
    })
}

/// Splits a response body into lines, as they arrive.
fn split_lines(
    url: String,
    response: Response,
) -> impl Stream<Item = Result<ResultLine, ClientError>> + Send + 'static {
    struct State<S> {
        body: S,
        buf: BytesMut,
        url: String,
        done: bool,
    }
    let state = State {
        body: response.bytes_stream(),
        buf: BytesMut::new(),
        url,
        done: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(at) = state.buf.iter().position(|b| *b == b'\n') {
                let mut line = state.buf.split_to(at + 1);
                line.truncate(at);
                if line.last() == Some(&b'\r') {
                    line.truncate(at - 1);
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some((Ok(line.freeze()), state));
            }
            if state.done {
                return None;
            }
            match state.body.next().await {
                Some(Ok(chunk)) => state.buf.extend_from_slice(&chunk),
                Some(Err(source)) => {
                    // The partial line is dropped: the caller resumes before it.
                    state.done = true;
                    state.buf.clear();
                    let err = ClientError::Connect {
                        url: state.url.clone(),
                        source,
                    };
                    return Some((Err(err), state));
                }
                None => {
                    // A clean end: a last line without its newline is still a line.
                    state.done = true;
                    if state.buf.iter().all(u8::is_ascii_whitespace) {
                        return None;
                    }
                    state.buf.extend_from_slice(b"\n");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_keep_their_path() {
        let client = ApiClient::new("http://h:1/prefix", "t").unwrap();
        assert_eq!(
            client.url("v1/batches").unwrap().as_str(),
            "http://h:1/prefix/v1/batches"
        );
        let client = ApiClient::new("http://h:1", "t").unwrap();
        assert_eq!(client.url("health").unwrap().as_str(), "http://h:1/health");
        assert!(matches!(
            ApiClient::new("ftp://h", "t"),
            Err(ClientError::Url { .. })
        ));
        assert!(ApiClient::new("not a url", "t").is_err());
    }

    #[test]
    fn worker_ids_are_one_path_segment() {
        assert_eq!(segment("w-1_a.b"), "w-1_a.b");
        assert_eq!(segment("a/b?c"), "a%2Fb%3Fc");
    }

    #[tokio::test]
    async fn chunks_carry_every_byte() {
        let data: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17)).map(|i| i as u8).collect();
        let got: Vec<Bytes> = chunks(std::io::Cursor::new(data.clone()))
            .map(Result::unwrap)
            .collect()
            .await;
        assert!(got.len() >= 3, "{}", got.len());
        assert_eq!(got.concat(), data);
    }
}
