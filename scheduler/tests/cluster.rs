//! The scheduler and three workers as separate processes (each worker in a network namespace
//! of its own, joined to the host by a veth pair, where the machine allows it). The workers
//! use the simulated executor: this is a scheduler-only test, no code runs. One worker is
//! killed with SIGKILL halfway, then the scheduler is killed with SIGKILL and restarted on the
//! same store; every job must end with exactly one result.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use shardbox_scheduler::ApiClient;

const CLIENT: &str = "cluster-client-token-0123";
const WORKER: &str = "cluster-worker-token-0123";
const JOBS: u64 = 3000;

/// A child process, killed with SIGKILL and reaped when dropped.
struct Proc(Child);

impl Proc {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A network namespace with a veth pair to the host: the host end is `10.231.<n>.1`, the
/// namespace end `10.231.<n>.2`.
struct NetNs {
    name: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl NetNs {
    fn create(n: u32) -> Option<NetNs> {
        let tag = std::process::id() % 100_000;
        let name = format!("sbxc{tag}n{n}");
        let host = format!("sbh{tag}n{n}");
        let peer = format!("sbp{tag}n{n}");
        let host_ip = format!("10.231.{n}.1/30");
        let peer_ip = format!("10.231.{n}.2/30");
        let ns = NetNs { name: name.clone() };
        let ok = ip(&["netns", "add", &name])
            && ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])
            && ip(&["link", "set", &peer, "netns", &name])
            && ip(&["addr", "add", &host_ip, "dev", &host])
            && ip(&["link", "set", &host, "up"])
            && ip(&[
                "netns", "exec", &name, "ip", "addr", "add", &peer_ip, "dev", &peer,
            ])
            && ip(&["netns", "exec", &name, "ip", "link", "set", &peer, "up"])
            && ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        if ok {
            Some(ns)
        } else {
            // Dropping `ns` deletes what was made; the host end goes with its peer, or here.
            ip(&["link", "del", &host]);
            None
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.name]);
    }
}

fn shardbox() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shardbox"))
}

fn start_scheduler(config: &Path, log: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Proc(
        shardbox()
            .args(["scheduler", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn start_worker(n: u32, ns: Option<&NetNs>, port: u16, log: &Path) -> Proc {
    let (mut command, url) = match ns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_shardbox")]);
            (command, format!("http://10.231.{n}.1:{port}"))
        }
        None => (shardbox(), format!("http://127.0.0.1:{port}")),
    };
    let log = std::fs::File::create(log).unwrap();
    Proc(
        command
            .args([
                "worker",
                "--simulated-executor",
                "--templates",
                "python=8",
                "--job-ms",
                "60",
            ])
            .args(["--scheduler", &url])
            .env("SHARDBOX_WORKER_TOKEN", WORKER)
            .env("SHARDBOX_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

async fn wait_healthy(client: &ApiClient) {
    let start = Instant::now();
    while client.health().await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the scheduler never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Results of batch `id` from `offset` until `until` are in hand or the stream ends; returns
/// the lines read. Connection errors end the read (the caller resumes).
async fn read_results(client: &ApiClient, id: u64, seen: &mut Vec<serde_json::Value>, until: u64) {
    let Ok(mut lines) = client.results(id, seen.len() as u64, true).await else {
        tokio::time::sleep(Duration::from_millis(100)).await;
        return;
    };
    while let Some(line) = lines.next().await {
        let Ok(line) = line else { return };
        seen.push(serde_json::from_slice(&line).unwrap());
        if seen.len() as u64 >= until {
            return;
        }
    }
}

/// A scheduler process on a free port with its store in a new directory; `listen` is the
/// address to bind (`0.0.0.0` lets workers in other network namespaces reach it) and `extra`
/// more `[scheduler]` settings.
struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    client: ApiClient,
}

impl Cluster {
    async fn start(listen: &str, extra: &str) -> (Cluster, Proc) {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("scheduler.toml");
        std::fs::write(
            &config,
            format!(
                "[scheduler]\nlisten = \"{listen}:{port}\"\ndata_dir = \"{}\"\n{extra}\n\
                 client_tokens = [\"{CLIENT}\"]\nworker_tokens = [\"{WORKER}\"]\n",
                dir.path().join("store").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("scheduler.log");
        let scheduler = start_scheduler(&config, &log);
        let client = ApiClient::new(&format!("http://127.0.0.1:{port}"), CLIENT).unwrap();
        wait_healthy(&client).await;
        let cluster = Cluster {
            dir,
            port,
            config,
            log,
            client,
        };
        (cluster, scheduler)
    }

    /// Kills nothing: starts the scheduler again on the same store and port.
    async fn restart(&self) -> Proc {
        let scheduler = start_scheduler(&self.config, &self.log);
        wait_healthy(&self.client).await;
        scheduler
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_gets_one_result_through_a_dead_worker_and_a_scheduler_restart() {
    let (cluster, mut scheduler) =
        Cluster::start("0.0.0.0", "lease_ms = 1500\nmax_attempts = 5").await;
    let (dir, port, client) = (cluster.dir.path(), cluster.port, &cluster.client);

    let namespaces: Vec<Option<NetNs>> = (1..=3).map(NetNs::create).collect();
    let isolated = namespaces.iter().filter(|ns| ns.is_some()).count();
    eprintln!("{isolated} of 3 workers run in network namespaces of their own");
    let mut workers: Vec<Proc> = (1..=3)
        .map(|n| {
            let log = dir.join(format!("worker{n}.log"));
            start_worker(n, namespaces[n as usize - 1].as_ref(), port, &log)
        })
        .collect();

    let body: String = (0..JOBS)
        .map(|n| format!("{{\"id\":\"job-{n}\",\"code\":\"print({n})\"}}\n"))
        .collect();
    let batch_file = dir.join("batch.jsonl");
    std::fs::write(&batch_file, body).unwrap();
    let accepted = client.submit_file(&batch_file, "cluster", 0).await.unwrap();
    assert_eq!(accepted.accepted, JOBS);
    let id = accepted.batch;

    let mut seen = Vec::new();
    let start = Instant::now();
    while (seen.len() as u64) < JOBS / 3 {
        read_results(client, id, &mut seen, JOBS / 3).await;
    }
    workers[0].kill();
    eprintln!("worker 1 killed with SIGKILL after {} results", seen.len());
    while (seen.len() as u64) < JOBS / 2 {
        read_results(client, id, &mut seen, JOBS / 2).await;
    }
    scheduler.kill();
    eprintln!("scheduler killed with SIGKILL after {} results", seen.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    scheduler = cluster.restart().await;
    while (seen.len() as u64) < JOBS {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "only {} of {JOBS} results after 3 minutes",
            seen.len()
        );
        read_results(client, id, &mut seen, JOBS).await;
    }
    let status = client.batch(id).await.unwrap();
    assert_eq!(status.results, JOBS, "{status:?}");
    assert_eq!(format!("{:?}", status.state), "Done");

    let mut by_line: HashMap<u64, Vec<&serde_json::Value>> = HashMap::new();
    for result in &seen {
        by_line
            .entry(result["line"].as_u64().unwrap())
            .or_default()
            .push(result);
    }
    assert_eq!(by_line.len() as u64, JOBS, "every line has a result");
    for line in 1..=JOBS {
        let results = &by_line[&line];
        assert_eq!(
            results.len(),
            1,
            "line {line} has {} results",
            results.len()
        );
        assert_eq!(results[0]["id"], format!("job-{}", line - 1));
        assert_eq!(results[0]["status"], "ok", "{}", results[0]);
    }
    let retried = seen
        .iter()
        .filter(|r| r["attempts"].as_u64().unwrap() > 1)
        .count();
    eprintln!("{retried} jobs ran more than once before their result counted");
    // The whole stream read again after the restart is the same, one line per job.
    let mut again = Vec::new();
    read_results(client, id, &mut again, JOBS + 1).await;
    assert_eq!(again.len() as u64, JOBS);
    // Prometheus metrics of the restarted scheduler, behind a token.
    let metrics = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shardbox_scheduler_results_total{status=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shardbox_scheduler_leased_total"),
        "{metrics}"
    );
    drop(workers);
    drop(scheduler);
    drop(namespaces);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_killed_mid_upload_keeps_and_runs_every_line_it_stored() {
    let (cluster, mut scheduler) =
        Cluster::start("127.0.0.1", "lease_ms = 1500\ncommit_jobs = 2000").await;
    let (dir, port, client) = (cluster.dir.path(), cluster.port, &cluster.client);
    let lines = 400_000u64;
    let body: String = (0..lines)
        .map(|n| format!("{{\"id\":\"u{n}\",\"code\":\"pass\"}}\n"))
        .collect();
    let batch_file = dir.join("batch.jsonl");
    std::fs::write(&batch_file, body).unwrap();
    let upload = {
        let client = client.clone();
        tokio::spawn(async move { client.submit_file(&batch_file, "killed", 0).await })
    };
    // Kill the scheduler once part of the batch is stored.
    let id = loop {
        if let Ok(batches) = client.batches().await {
            if let Some(b) = batches.iter().find(|b| b.accepted > 0) {
                break b.batch;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    scheduler.kill();
    let outcome = upload.await.unwrap();
    assert!(
        outcome.is_err(),
        "the upload cannot have been acknowledged: {outcome:?}"
    );
    scheduler = cluster.restart().await;
    let status = client.batch(id).await.unwrap();
    assert!(status.truncated, "{status:?}");
    assert!(status.accepted > 0 && status.accepted < lines, "{status:?}");
    assert_eq!(
        status.queued, status.accepted,
        "every stored line is queued again"
    );
    let stored = status.accepted;
    let worker_log = dir.join("worker.log");
    let worker = start_worker(0, None, port, &worker_log);
    let mut seen = Vec::new();
    let start = Instant::now();
    while (seen.len() as u64) < stored {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} of {stored}",
            seen.len()
        );
        read_results(client, id, &mut seen, stored).await;
    }
    let mut lines_seen: Vec<u64> = seen.iter().map(|r| r["line"].as_u64().unwrap()).collect();
    lines_seen.sort_unstable();
    lines_seen.dedup();
    assert_eq!(
        lines_seen.len() as u64,
        stored,
        "one result per stored line"
    );
    assert_eq!(
        *lines_seen.last().unwrap(),
        stored,
        "the stored lines are the first ones"
    );
    let status = client.batch(id).await.unwrap();
    assert_eq!(format!("{:?}", status.state), "Done", "{status:?}");
    drop(worker);
    drop(scheduler);
}
