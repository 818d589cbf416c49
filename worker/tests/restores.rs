//! Kind F7: stdio stays whole across many restores of one checkpoint. Each job prints a line,
//! writes 4 MiB to stdout, a line to stderr and a last line; every result must be complete and
//! no restore may hang. `SHARDBOX_F7_RESTORES` sets the count (1,000 by default).

mod common;

use shardbox_proto::{Job, Status};

#[test]
fn every_restore_keeps_its_stdio_whole() {
    let h = common::shared(common::worker_config);
    let count: usize = std::env::var("SHARDBOX_F7_RESTORES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let code = "import sys\n\
                print('first', flush=True)\n\
                sys.stdout.write('x' * (4 << 20))\n\
                sys.stdout.flush()\n\
                sys.stderr.write('to stderr\\n')\n\
                print('last')\n";
    let expected_len = "first\n".len() + (4 << 20) + "last\n".len();
    let started = std::time::Instant::now();
    let mut done = 0;
    // In waves, so the pool is drained and refilled over and over.
    while done < count {
        let wave = (count - done).min(16);
        let jobs = (0..wave)
            .map(|i| Job {
                max_output_bytes: Some(8 << 20),
                ..common::py_limited(&format!("f7-{}", done + i), code, 30_000)
            })
            .collect();
        for ran in common::run_all(h, jobs) {
            let r = &ran.result;
            assert_eq!(
                r.status,
                Status::Ok,
                "{}: {:?}",
                r.id,
                (r.status, &r.error, &r.stderr)
            );
            assert_eq!(r.stdout.len(), expected_len, "{}", r.id);
            assert!(r.stdout.starts_with("first\nxxxx") && r.stdout.ends_with("xxxxlast\n"));
            assert_eq!(r.stderr, "to stderr\n");
        }
        done += wave;
    }
    println!("{count} restores in {:?}", started.elapsed());
}
