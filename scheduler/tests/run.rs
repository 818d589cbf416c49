//! `shardbox run` end to end with real runsc: HumanEval samples, a batch with bad lines, and an
//! interrupted run. The tests share one state directory and take turns on it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use shardbox_proto::{JobResult, Status};

const NAME: &str = "sched-run";

fn humaneval(out: &Path, variant: &str) {
    let status = Command::new("python3")
        .current_dir(common::workspace())
        .args(["scripts/humaneval.py", "--out"])
        .arg(out)
        .args(["--limit", "12", "--seed", "1", "--variant", variant])
        .status()
        .expect("run scripts/humaneval.py");
    assert!(status.success(), "humaneval.py failed: {status}");
}

fn run_batch(dir: &Path, batch: &Path, out: &Path, extra: &[&str]) -> common::Run {
    let config = common::config_file(dir, NAME, |text| text);
    common::spawn(common::run_command(batch, out, &config, extra)).wait()
}

fn by_id(results: &[JobResult]) -> BTreeMap<String, JobResult> {
    let map: BTreeMap<String, JobResult> =
        results.iter().map(|r| (r.id.clone(), r.clone())).collect();
    assert_eq!(map.len(), results.len(), "an id has two results");
    map
}

#[test]
fn humaneval_samples_pass_and_fail_as_expected() {
    let _turn = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    for (variant, status, pass) in [
        ("canonical", Status::Ok, "pass@1: 12/12 = 1.000"),
        ("wrong", Status::Failed, "pass@1: 0/12 = 0.000"),
    ] {
        let batch = dir.path().join(format!("{variant}.jsonl"));
        let out = dir.path().join(format!("{variant}-results.jsonl"));
        humaneval(&batch, variant);
        let run = run_batch(dir.path(), &batch, &out, &[]);
        assert_eq!(run.code(), Some(0), "{variant}: {run:?}");
        assert!(run.stdout.contains(pass), "{variant}: {}", run.stdout);
        assert!(run.stderr.contains(pass), "{variant}: {}", run.stderr);
        assert!(
            run.stderr.contains("building or loading templates"),
            "{}",
            run.stderr
        );

        let ids = common::batch_ids(&batch);
        assert_eq!(ids.len(), 12);
        let results = common::results(&out);
        assert_eq!(results.len(), ids.len(), "{variant}: one result per line");
        let results = by_id(&results);
        for id in &ids {
            let r = &results[id];
            assert_eq!(r.status, status, "{variant} {id}: {r:?}");
            match status {
                Status::Ok => assert_eq!(r.exit_code, Some(0), "{r:?}"),
                _ => assert_ne!(r.exit_code, Some(0), "{r:?}"),
            }
            assert_eq!(r.labels["problem"], id.as_str());
            assert_eq!(r.attempts, 1);
            let line = r.line.expect("every result names its line") as usize;
            assert_eq!(ids[line - 1], r.id, "{r:?}");
            assert!(!r.worker.is_empty());
            assert!(r.timing.total_ms >= r.timing.queue_ms, "{:?}", r.timing);
            assert!(r.timing.total_ms >= r.timing.run_ms, "{:?}", r.timing);
            assert!(r.timing.start_us > 0, "{:?}", r.timing);
        }
        assert!(
            common::leftovers(NAME).is_empty(),
            "sandboxes left after shutdown: {:?}",
            common::leftovers(NAME)
        );
    }
}

#[test]
fn bad_lines_get_invalid_results_and_good_jobs_still_run() {
    let _turn = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("mixed.jsonl");
    let out = dir.path().join("mixed-results.jsonl");
    let mut text = [
        r#"{"id": "m1", "code": "#,
        r#"{"id": "good-1", "code": "print(6 * 7)"}"#,
        r#"{"id": "t1", "template": "nope", "code": "print(1)"}"#,
        "",
        r#"{"id": "good-1", "code": "print(1)"}"#,
        r#"{"id": "big", "code": "print(1)", "timeout_ms": 999999999}"#,
        r#"{"id": "argv1", "argv": ["echo", "hi"]}"#,
        r#"{"id": "exec-1", "template": "exec", "argv": ["python3", "-c", "print(2)"]}"#,
    ]
    .join("\n")
    .into_bytes();
    text.extend_from_slice(b"\n{\"id\": \"bad-\xff\", \"code\": \"print(1)\"}\n");
    text.extend_from_slice(
        br#"{"id": "uf", "code": "print(1)", "timeout": 5}
{"id": "good-2", "code": "import sys; print(sys.stdin.read().upper())", "stdin": "abc"}
"#,
    );
    std::fs::write(&batch, text).unwrap();

    let run = run_batch(dir.path(), &batch, &out, &[]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    let results = common::results(&out);
    assert_eq!(results.len(), 10, "11 lines, one blank: {results:#?}");

    let expected: [(u64, &str, &str); 7] = [
        (1, "line-1", "malformed job"),
        (3, "t1", "unknown template \"nope\""),
        (5, "good-1", "duplicate job id"),
        (6, "big", "timeout_ms 999999999 is above"),
        (7, "argv1", "give code, not argv"),
        (9, "line-9", "not valid UTF-8"),
        (10, "uf", "unknown field `timeout`"),
    ];
    let invalid: BTreeMap<u64, &JobResult> = results
        .iter()
        .filter(|r| r.status == Status::Invalid)
        .map(|r| (r.line.expect("invalid results carry their line"), r))
        .collect();
    assert_eq!(invalid.len(), expected.len(), "{invalid:#?}");
    for (line, id, reason) in expected {
        let r = invalid
            .get(&line)
            .unwrap_or_else(|| panic!("no invalid result for line {line}"));
        assert_eq!(r.id, id, "line {line}");
        let error = r.error.as_deref().unwrap_or_default();
        assert!(error.starts_with(&format!("line {line}: ")), "{error}");
        assert!(error.contains(reason), "line {line}: {error}");
        assert_eq!(r.attempts, 0);
    }

    let ran: BTreeMap<&str, &JobResult> = results
        .iter()
        .filter(|r| r.status != Status::Invalid)
        .map(|r| (r.id.as_str(), r))
        .collect();
    assert_eq!(ran.len(), 3, "{ran:#?}");
    for (id, stdout) in [("good-1", "42\n"), ("exec-1", "2\n"), ("good-2", "ABC\n")] {
        let r = ran[id];
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert_eq!(r.stdout, stdout, "{r:?}");
        assert!(r.line.is_some(), "every result names its line: {r:?}");
    }
    assert!(
        run.stdout.contains("status: ok 3, invalid 7"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("pass@1"), "{}", run.stdout);
}

#[test]
fn an_interrupt_cancels_waiting_jobs_and_still_writes_every_result() {
    let _turn = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("slow.jsonl");
    let out = dir.path().join("slow-results.jsonl");
    let lines: Vec<String> = (0..30)
        .map(|i| {
            serde_json::json!({
                "id": format!("slow-{i}"),
                "code": "import time; time.sleep(1); print('done')",
            })
            .to_string()
        })
        .collect();
    std::fs::write(&batch, lines.join("\n") + "\n").unwrap();
    let config = common::config_file(dir.path(), NAME, |text| text);
    let cmd = common::run_command(&batch, &out, &config, &["--max-running", "2"]);
    let running = common::spawn(cmd);

    // Interrupt once the first result is in.
    let until = Instant::now() + common::DEADLINE;
    while std::fs::read_to_string(&out).map_or(true, |t| t.is_empty()) {
        assert!(Instant::now() < until, "no result came");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = running.child.id().to_string();
    let kill = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(kill.success());
    let run = running.wait();

    assert_eq!(run.code(), Some(130), "{run:?}");
    assert!(run.stderr.contains("SIGINT"), "{}", run.stderr);
    let results = common::results(&out);
    assert_eq!(results.len(), 30, "every line gets a result");
    let results = by_id(&results);
    let count = |status| results.values().filter(|r| r.status == status).count();
    assert!(count(Status::Ok) >= 1, "{results:#?}");
    assert!(count(Status::Cancelled) >= 10, "{results:#?}");
    assert_eq!(count(Status::Ok) + count(Status::Cancelled), 30);
    for r in results.values().filter(|r| r.status == Status::Cancelled) {
        assert!(r.error.as_deref().unwrap().contains("cancelled"), "{r:?}");
    }
    assert!(
        common::leftovers(NAME).is_empty(),
        "sandboxes left after shutdown: {:?}",
        common::leftovers(NAME)
    );
}
