//! Kind F8: templates whose warm-up leaves state a checkpoint may not carry (an open unlinked
//! file, a background process). Either the build fails at once with a clear reason, or 100 of
//! 100 restores work: a broken checkpoint is never first seen at job time.

mod common;

use shardbox_proto::{Job, Status};
use shardbox_worker::Worker;

const ENTRY: &str = "exec(open('/opt/shardbox/entry.py').read())";

fn config(name: &str, warmup: &str) -> shardbox_worker::WorkerConfig {
    let entry = format!("import sys; sys.argv = ['entry', 'python']\\n{warmup}\\n{ENTRY}");
    common::test_config(&format!("tmpl-{name}"), |text| {
        let (head, _) = text.split_once("[templates.python]").unwrap();
        format!(
            "{head}[templates.python]\nkind = \"python\"\n\
             rootfs = \"/var/cache/shardbox/rootfs/python-bookworm\"\n\
             entrypoint = [\"python3\", \"-c\", \"{entry}\"]\n\
             pool = {{ min_idle = 2, max_idle = 4, max_in_flight = 2, fill = \"restore\" }}\n"
        )
    })
}

fn check(name: &str, warmup: &str) {
    let config = config(name, warmup);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = rt.block_on(Worker::start(&config));
    let worker = match started {
        Ok(worker) => worker,
        Err(err) => {
            let text = format!("{err:#}");
            assert!(
                text.contains("template python"),
                "unclear build error: {text}"
            );
            println!("{name}: the build refused the template: {err}");
            return;
        }
    };
    let ok = rt.block_on(async {
        let mut ok = 0;
        for i in 0..100 {
            let job = Job {
                id: format!("{name}-{i}"),
                code: Some("print('fine')".into()),
                ..Job::default()
            };
            let prepared = worker.prepare(job).unwrap();
            let sandbox = worker.acquire("python").await.expect("sandbox");
            let r = worker
                .run(sandbox, &prepared, std::time::Instant::now())
                .await;
            assert_eq!(r.status, Status::Ok, "{name} restore {i}: {r:?}");
            assert_eq!(r.stdout, "fine\n");
            ok += 1;
        }
        worker.shutdown().await;
        ok
    });
    assert_eq!(ok, 100);
    println!("{name}: 100 of 100 restores worked");
}

#[test]
fn warmup_with_an_open_unlinked_file() {
    check(
        "unlinked",
        "import tempfile; keep = tempfile.TemporaryFile(); keep.write(b'warm'); keep.flush()",
    );
}

#[test]
fn warmup_with_a_background_process() {
    check(
        "background",
        "import subprocess; keep = subprocess.Popen(['sleep', '100000'])",
    );
}
