//! `shardbox` exit codes and messages when shardbox itself cannot do its work.

mod common;

#[test]
fn a_missing_batch_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let run = common::run(&[
        "run",
        "/nonexistent/batch.jsonl",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        run.stderr
            .contains("cannot open batch file /nonexistent/batch.jsonl"),
        "{}",
        run.stderr
    );
    assert!(
        !out.exists(),
        "nothing is written for a run that never started"
    );
}

#[test]
fn unusable_results_paths_and_configs_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("batch.jsonl");
    std::fs::write(&batch, "{\"id\": \"a\", \"code\": \"print(1)\"}\n").unwrap();
    let batch = batch.to_str().unwrap();

    let run = common::run(&["run", batch, "--out", "/nonexistent/dir/out.jsonl"]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        run.stderr.contains("cannot create results file"),
        "{}",
        run.stderr
    );

    let run = common::run(&["run", batch, "--out", batch]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("is the batch file"), "{}", run.stderr);

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[templates.python]\nkind = \"python\"\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let run = common::run(&[
        "run",
        batch,
        "--out",
        out.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        run.stderr.contains("missing field `rootfs`"),
        "{}",
        run.stderr
    );

    let run = common::run(&["run", batch]);
    assert_eq!(run.code(), Some(2), "--out is required: {run:?}");
}

#[test]
fn a_missing_rootfs_is_a_sandbox_failure_that_points_to_setup() {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("batch.jsonl");
    std::fs::write(&batch, "{\"id\": \"a\", \"code\": \"print(1)\"}\n").unwrap();
    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, "old results\n").unwrap();
    let config = common::config_file(dir.path(), "sched-norootfs", |text| {
        text.replace(
            "/var/cache/shardbox/rootfs/python-bookworm",
            "/nonexistent/rootfs",
        )
    });
    let mut cmd = common::run_command(&batch, &out, &config, &[]);
    // The variable would replace the broken rootfs with a working one.
    cmd.env_remove("SHARDBOX_ROOTFS");
    let run = common::spawn(cmd).wait();
    assert_eq!(run.code(), Some(4), "{run:?}");
    assert!(
        run.stderr.contains("the worker could not start"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("/nonexistent/rootfs"), "{}", run.stderr);
    assert!(run.stderr.contains("scripts/setup.sh"), "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "old results\n",
        "a failed start leaves an old results file alone"
    );
}

#[test]
fn version_names_shardbox_and_runsc() {
    let run = common::run(&["--version"]);
    assert_eq!(run.code(), Some(0));
    assert!(run.stdout.starts_with("shardbox "), "{}", run.stdout);
    let run = common::run(&["version"]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(run.stdout.starts_with("shardbox "), "{}", run.stdout);
    assert!(run.stdout.contains("runsc"), "{}", run.stdout);
}
