//! Shared harness of the `shardbox` binary tests: configurations with their own state
//! directories, batches, and running the binary with a deadline.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shardbox_proto::JobResult;

/// How long one run of the binary may take, template build included.
pub const DEADLINE: Duration = Duration::from_secs(300);

/// Tests that start a worker on the shared state directory hold this, so that two workers never
/// use one state directory at once (a worker deletes what it finds there when it starts).
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The workspace root, where `scripts/` lives.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the scheduler crate sits in the workspace")
        .to_owned()
}

/// The state directory of tests named `name`.
pub fn state_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/tmp/shardbox-test-{name}"))
}

/// Writes the embedded configuration with its state under [`state_dir`] (`name`) into `dir`,
/// after applying `edit` to the text, and returns the file's path.
pub fn config_file(dir: &Path, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let text = shardbox_worker::config::EMBEDDED_CONFIG.replace(
        "state_dir = \"/var/lib/shardbox\"",
        &format!("state_dir = \"{}\"", state_dir(name).display()),
    );
    assert!(text.contains("shardbox-test-"), "state_dir line not found");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, edit(text)).expect("write config");
    path
}

/// What a run of the binary left.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// `shardbox ARGS...` with piped output.
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardbox"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `shardbox run BATCH --out OUT --config CONFIG EXTRA...` with piped output.
pub fn run_command(batch: &Path, out: &Path, config: &Path, extra: &[&str]) -> Command {
    let mut args = vec![
        "run",
        batch.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    command(&args)
}

/// Starts `cmd` and collects its output in the background.
pub struct Running {
    pub child: Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

pub fn spawn(mut cmd: Command) -> Running {
    let mut child = cmd.spawn().expect("start shardbox");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    Running { child, out, err }
}

impl Running {
    /// Waits for the process to end, killing it and failing the test after [`DEADLINE`].
    pub fn wait(mut self) -> Run {
        let until = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for shardbox") {
                break status;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.err.join().unwrap_or_default();
                panic!("shardbox ran past {DEADLINE:?}; stderr:\n{stderr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Run {
            status,
            stdout: self.out.join().expect("stdout reader"),
            stderr: self.err.join().expect("stderr reader"),
        }
    }
}

/// Runs `shardbox ARGS...` to its end.
pub fn run(args: &[&str]) -> Run {
    spawn(command(args)).wait()
}

/// Reads a results file.
pub fn results(path: &Path) -> Vec<JobResult> {
    std::fs::read_to_string(path)
        .expect("read results")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The ids of a batch file, in order.
pub fn batch_ids(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read batch")
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("batch line");
            value["id"].as_str().expect("id").to_owned()
        })
        .collect()
}

/// Containers or bundles a worker left in its state directory after it shut down.
pub fn leftovers(name: &str) -> Vec<String> {
    match std::fs::read_dir(state_dir(name).join("sandboxes")) {
        Ok(entries) => entries
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}
