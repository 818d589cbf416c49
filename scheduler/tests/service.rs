//! The scheduler service in-process, over real HTTP, with the test playing the worker (no
//! sandboxes: the "worker" here answers leases itself, a simulated executor).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use shardbox_scheduler::service::{Service, ServiceConfig};

const CLIENT: &str = "client-token-0123456789";
const WORKER: &str = "worker-token-0123456789";

struct Harness {
    service: Option<Service>,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(adjust: impl FnOnce(&mut ServiceConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServiceConfig::for_tests(dir.path(), CLIENT, WORKER);
        adjust(&mut config);
        let service = Service::start(config, None).await.unwrap();
        Harness {
            base: format!("http://{}", service.addr),
            service: Some(service),
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    async fn restart(&mut self, adjust: impl FnOnce(&mut ServiceConfig)) {
        let service = self.service.take().unwrap();
        let mut config = service.scheduler.config().clone();
        service.stop().await.unwrap();
        config.listen = self.base.trim_start_matches("http://").parse().unwrap();
        adjust(&mut config);
        self.service = Some(Service::start(config, None).await.unwrap());
    }

    async fn submit(&self, body: String, query: &str) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/v1/batches?{query}", self.base))
            .bearer_auth(CLIENT)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(CLIENT)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn results(&self, batch: u64, offset: u64, follow: bool) -> Vec<Value> {
        let text = self
            .http
            .get(format!(
                "{}/v1/batches/{batch}/results?offset={offset}&follow={follow}",
                self.base
            ))
            .bearer_auth(CLIENT)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn worker_post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(WORKER)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn register(&self, templates: &[(&str, u32)]) -> String {
        let templates: BTreeMap<&str, u32> = templates.iter().copied().collect();
        let (status, body) = self
            .worker_post(
                "/v1/workers",
                json!({"name": "test", "templates": templates}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["worker"].as_str().unwrap().to_string()
    }

    async fn lease(&self, worker: &str, template: &str, n: u32, wait_ms: u64) -> (u16, Vec<Value>) {
        let (status, body) = self
            .worker_post(
                &format!("/v1/workers/{worker}/lease"),
                json!({"want": {template: n}, "wait_ms": wait_ms}),
            )
            .await;
        (status, body["jobs"].as_array().cloned().unwrap_or_default())
    }

    /// Sends an `ok` result for each leased job, echoing its id.
    async fn finish(&self, worker: &str, jobs: &[Value], worker_name: &str) -> Value {
        let results: Vec<Value> = jobs
            .iter()
            .map(|job| {
                json!({
                    "batch": job["batch"], "line": job["line"],
                    "result": {
                        "id": job["job"]["id"], "status": "ok", "exit_code": 0,
                        "stdout": "", "stderr": "", "worker": worker_name,
                        "attempts": job["attempt"], "line": job["line"]
                    }
                })
            })
            .collect();
        let (status, body) = self
            .worker_post(
                &format!("/v1/workers/{worker}/results"),
                json!({"results": results}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

fn batch(n: usize, prefix: &str) -> String {
    (0..n)
        .map(|i| format!("{{\"id\":\"{prefix}{i}\",\"code\":\"print({i})\"}}\n"))
        .collect()
}

#[tokio::test]
async fn a_batch_runs_through_lease_and_results_with_invalid_lines_numbered() {
    let h = Harness::start(|_| {}).await;
    let body = format!(
        "{}not json\n\n{{\"id\":\"a0\",\"code\":\"x\"}}\n{{\"id\":\"t\",\"template\":\"nope\",\"code\":\"x\"}}\n",
        batch(3, "a")
    );
    let (status, accepted) = h.submit(body, "name=first&priority=1").await;
    assert_eq!(status, 201, "{accepted}");
    assert_eq!(accepted["lines"], 6);
    assert_eq!(
        accepted["accepted"], 4,
        "the unknown template is a worker's matter: {accepted}"
    );
    assert_eq!(accepted["invalid"], 2, "{accepted}");
    let id = accepted["batch"].as_u64().unwrap();

    let worker = h.register(&[("python", 8)]).await;
    let (_, jobs) = h.lease(&worker, "python", 8, 1000).await;
    assert_eq!(
        jobs.len(),
        3,
        "the job naming template nope is not leased to a python worker"
    );
    assert!(jobs
        .iter()
        .all(|j| j["attempt"] == 1 && j["template"] == "python"));
    let answer = h.finish(&worker, &jobs, "w1").await;
    assert_eq!(answer["recorded"], 3);
    let again = h.finish(&worker, &jobs, "w1").await;
    assert_eq!(again["recorded"], 0);
    assert_eq!(
        again["duplicates"], 3,
        "a second result is counted once: {again}"
    );

    let (_, status) = h.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(status["state"], "running");
    assert_eq!(status["results"], 5);
    assert_eq!(status["queued"], 1, "{status}");
    assert_eq!(status["name"], "first");
    assert_eq!(status["statuses"]["invalid"], 2);

    let results = h.results(id, 0, false).await;
    assert_eq!(results.len(), 5);
    let invalid: Vec<(u64, String)> = results
        .iter()
        .filter(|r| r["status"] == "invalid")
        .map(|r| {
            (
                r["line"].as_u64().unwrap(),
                r["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(invalid.len(), 2);
    assert_eq!(invalid[0].0, 4);
    assert_eq!(
        invalid[1].0, 6,
        "line numbers count the blank line, as in `shardbox run`"
    );
    assert!(
        invalid[1].1.contains("duplicate job id \"a0\""),
        "{invalid:?}"
    );

    // A follower started now gets the rest once a worker for `nope` comes.
    let follower = {
        let http = h.http.clone();
        let url = format!("{}/v1/batches/{id}/results?offset=3&follow=true", h.base);
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(CLIENT)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    };
    let other = h.register(&[("nope", 1)]).await;
    let (_, jobs) = h.lease(&other, "nope", 4, 1000).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["line"], 7);
    h.finish(&other, &jobs, "w2").await;
    let tail = tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tail.lines().count(), 3, "{tail}");
    let (_, status) = h.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(status["state"], "done");
}

#[tokio::test]
async fn requests_without_a_valid_token_are_refused_except_health() {
    let h = Harness::start(|_| {}).await;
    let http = &h.http;
    let health = http.get(format!("{}/health", h.base)).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    for (method, path) in [
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches"),
        ("GET", "/metrics"),
        ("POST", "/v1/workers"),
    ] {
        let url = format!("{}{path}", h.base);
        let request = if method == "POST" {
            http.post(&url)
        } else {
            http.get(&url)
        };
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            401,
            "{method} {path} without a token"
        );
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("token"));
    }
    // A worker token does not submit, a client token does not register.
    let response = http
        .post(format!("{}/v1/batches", h.base))
        .bearer_auth(WORKER)
        .body(batch(1, "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let response = http
        .post(format!("{}/v1/workers", h.base))
        .bearer_auth(CLIENT)
        .json(&json!({"name": "x", "templates": {"python": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let (_, listed) = h.get("/v1/batches").await;
    assert_eq!(
        listed.as_array().unwrap().len(),
        0,
        "nothing was stored by refused requests"
    );
}

#[tokio::test]
async fn an_oversized_batch_is_refused_and_what_was_accepted_still_runs() {
    let h = Harness::start(|c| {
        c.max_batch_bytes = 4096;
        c.commit_jobs = 8;
    })
    .await;
    // With a declared length over the limit nothing is stored.
    let (status, body) = h.submit(batch(200, "big"), "").await;
    assert_eq!(status, 413, "{body}");
    assert!(body["batch"].is_null());
    // Streamed without a length, the lines before the limit are kept.
    let chunks: Vec<Result<String, std::io::Error>> =
        (0..20).map(|c| Ok(batch(10, &format!("s{c}-")))).collect();
    let response = h
        .http
        .post(format!("{}/v1/batches", h.base))
        .bearer_auth(CLIENT)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let body: Value = response.json().await.unwrap();
    let id = body["batch"].as_u64().expect("the batch id is reported");
    let accepted = body["accepted"].as_u64().unwrap();
    assert!(accepted > 0 && accepted < 200, "{body}");
    let (_, status) = h.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(status["truncated"], true);
    assert_eq!(status["queued"].as_u64().unwrap(), accepted);
}

#[tokio::test]
async fn a_silent_worker_loses_its_jobs_and_attempts_end_in_sandbox_error() {
    let h = Harness::start(|c| {
        c.lease_ms = 300;
        c.max_attempts = 2;
    })
    .await;
    let (_, accepted) = h.submit(batch(4, "j"), "").await;
    let id = accepted["batch"].as_u64().unwrap();
    let first = h.register(&[("python", 4)]).await;
    let (_, jobs) = h.lease(&first, "python", 4, 1000).await;
    assert_eq!(jobs.len(), 4);
    // `first` goes silent. Its jobs come back at attempt 2 to another worker.
    let second = h.register(&[("python", 4)]).await;
    let mut again = Vec::new();
    for _ in 0..20 {
        h.worker_post(&format!("/v1/workers/{second}/heartbeat"), json!({}))
            .await;
        let (_, jobs) = h.lease(&second, "python", 4, 200).await;
        again.extend(jobs);
        if again.len() == 4 {
            break;
        }
    }
    assert_eq!(again.len(), 4);
    assert!(again.iter().all(|j| j["attempt"] == 2), "{again:?}");
    // The silent worker comes back: its id is gone.
    let (status, _) = h
        .worker_post(&format!("/v1/workers/{first}/heartbeat"), json!({}))
        .await;
    assert_eq!(status, 404);
    // ...but its late result for line 1 still counts, once; the others finish on `second`
    // except line 4, whose worker goes silent at the last attempt.
    h.finish(&first, &jobs[..1], "first").await;
    let done: Vec<Value> = again.iter().filter(|j| j["line"] != 4).cloned().collect();
    let answer = h.finish(&second, &done, "second").await;
    assert_eq!(answer["recorded"], 2);
    assert_eq!(answer["duplicates"], 1);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let results = h.results(id, 0, true).await;
    assert_eq!(results.len(), 4);
    let last = results.iter().find(|r| r["line"] == 4).unwrap();
    assert_eq!(last["status"], "sandbox_error");
    assert_eq!(last["id"], "j3");
    assert_eq!(last["attempts"], 2);
    assert!(last["error"]
        .as_str()
        .unwrap()
        .contains("gave up after 2 attempts"));
}

#[tokio::test]
async fn a_small_batch_is_not_stuck_behind_a_large_one_and_priority_comes_first() {
    let h = Harness::start(|_| {}).await;
    let (_, big) = h.submit(batch(5000, "big"), "").await;
    let (_, small) = h.submit(batch(10, "small"), "").await;
    let worker = h.register(&[("python", 64)]).await;
    let (_, jobs) = h.lease(&worker, "python", 20, 0).await;
    let small_id = small["batch"].clone();
    let smalls = jobs.iter().filter(|j| j["batch"] == small_id).count();
    assert_eq!(smalls, 10, "the small batch gets half of the first lease");
    let (_, urgent) = h.submit(batch(3, "urgent"), "priority=5").await;
    let (_, jobs) = h.lease(&worker, "python", 5, 0).await;
    let urgent_id = urgent["batch"].clone();
    assert_eq!(jobs.iter().filter(|j| j["batch"] == urgent_id).count(), 3);
    assert!(jobs[3..].iter().all(|j| j["batch"] == big["batch"]));
}

#[tokio::test]
async fn cancel_ends_queued_jobs_and_a_restart_keeps_everything() {
    let mut h = Harness::start(|c| c.commit_jobs = 100).await;
    let (_, accepted) = h.submit(batch(1000, "c"), "").await;
    let id = accepted["batch"].as_u64().unwrap();
    let worker = h.register(&[("python", 10)]).await;
    let (_, jobs) = h.lease(&worker, "python", 10, 0).await;
    h.finish(&worker, &jobs[..5], "w").await;

    // A restart: leases are forgotten, the five unfinished leased jobs are queued again.
    h.restart(|_| {}).await;
    let (_, status) = h.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(status["results"], 5);
    assert_eq!(status["queued"], 995, "{status}");
    let (status, _) = h.lease(&worker, "python", 1, 0).await;
    assert_eq!(status, 404, "worker ids do not survive a restart");
    // A result from before the restart is still taken.
    let answer = h.finish(&worker, &jobs[5..6], "w").await;
    assert_eq!(answer["recorded"], 1);

    let (code, status) = h.worker_post("/v1/batches/0/cancel", json!({})).await;
    assert_eq!(code, 401, "{status}");
    let response = h
        .http
        .post(format!("{}/v1/batches/{id}/cancel", h.base))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    let status: Value = response.json().await.unwrap();
    assert_eq!(status["cancelled"], true);
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["statuses"]["cancelled"], 994);
    let results = h.results(id, 0, true).await;
    assert_eq!(results.len(), 1000);
    let mut lines: Vec<u64> = results
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    lines.sort_unstable();
    lines.dedup();
    assert_eq!(lines.len(), 1000, "one result per line");
    h.restart(|_| {}).await;
    let (_, status) = h.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(status["state"], "done");
    assert_eq!(status["results"], 1000);
}

#[tokio::test]
async fn jobs_of_a_cancelled_batch_taken_back_from_a_silent_worker_end_cancelled() {
    let h = Harness::start(|c| c.lease_ms = 300).await;
    let body = format!("{{\"id\":\"x\",\"code\":1}}\n{}", batch(3, "k"));
    let body = body.replacen("\"k0\"", "\"x\"", 1);
    let (_, accepted) = h.submit(body, "").await;
    assert_eq!(
        accepted["invalid"], 2,
        "a malformed line's id still counts: {accepted}"
    );
    let id = accepted["batch"].as_u64().unwrap();
    let worker = h.register(&[("python", 8)]).await;
    let (_, jobs) = h.lease(&worker, "python", 8, 0).await;
    assert_eq!(jobs.len(), 2);
    let response = h
        .http
        .post(format!("{}/v1/batches/{id}/cancel", h.base))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // The worker goes silent; its two jobs are not queued again but cancelled.
    let results = tokio::time::timeout(Duration::from_secs(10), h.results(id, 0, true))
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    let cancelled: Vec<&Value> = results
        .iter()
        .filter(|r| r["status"] == "cancelled")
        .collect();
    assert_eq!(cancelled.len(), 2, "{results:?}");
    assert!(cancelled.iter().all(|r| r["id"] == "k1" || r["id"] == "k2"));
    let (_, status) = h.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(status["queued"], 0);
    assert_eq!(status["state"], "done");
}
