//! Kind F6: eight jobs at once each write 480 MB in 8 KB lines under a 1 MiB cap. Each result
//! keeps at most the cap and says it was truncated, and the worker's memory stays near eight caps
//! plus a constant. Alone in its binary so the process's peak memory is this test's.

mod common;

use shardbox_proto::{Job, Status};

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn eight_floods_at_once_stay_capped() {
    let h = common::shared(common::worker_config);
    common::assert_serves(h);
    let before = peak_rss_kib();
    let code = "import sys\n\
                line = 'z' * 8191 + '\\n'\n\
                w = sys.stdout.write\n\
                for _ in range(480 * 1000 * 1000 // 8192): w(line)\n";
    let jobs = (0..8)
        .map(|i| Job {
            max_output_bytes: Some(1 << 20),
            ..common::py_limited(&format!("flood{i}"), code, 120_000)
        })
        .collect();
    for ran in common::run_all(h, jobs) {
        let r = &ran.result;
        assert_eq!(
            r.status,
            Status::OutputLimit,
            "{:?}",
            (r.status, &r.error, r.timing)
        );
        assert!(r.stdout_truncated);
        assert_eq!(r.stdout.len(), 1 << 20);
        assert_eq!(r.stdout_bytes, 480 * 1000 * 1000 / 8192 * 8192);
        common::assert_gone(&ran.sandbox_id, std::time::Duration::from_secs(5));
    }
    let grown_mib = (peak_rss_kib() - before) / 1024;
    // Eight 1 MiB caps, their read buffers, and a constant for the runtime.
    assert!(grown_mib <= 8 + 32, "peak memory grew by {grown_mib} MiB");
    println!("peak memory grew by {grown_mib} MiB over {before} KiB");
    common::assert_serves(h);
}
