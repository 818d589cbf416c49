//! Real-runsc tests of process isolation (a process per job inside warm sandboxes of one trust
//! domain): the shared scenarios of `common/scenarios.rs`, then what is particular to this
//! level: jobs of one sandbox cannot see or disturb each other, sandboxes serve one domain
//! only, and a sandbox is recycled after a job runs out of memory.

mod common;

const TEMPLATE: &str = "python-process";

include!("common/scenarios.rs");

use std::sync::Arc;
use std::time::Instant;

/// Runs two jobs at once in one domain, the second started once the first is under way.
fn run_pair(first: Job, second: Job) -> (shardbox_proto::JobResult, shardbox_proto::JobResult) {
    let h = h();
    let worker = Arc::clone(&h.worker);
    h.rt.block_on(async move {
        let a = worker.prepare(first).unwrap();
        let b = worker.prepare(second).unwrap();
        // A domain of their own, so no other test's job shares the sandbox.
        let slot_a = worker.acquire_in(TEMPLATE, "pair").await.unwrap();
        let slot_b = worker.acquire_in(TEMPLATE, "pair").await.unwrap();
        assert_eq!(
            slot_a.sandbox_id(),
            slot_b.sandbox_id(),
            "one sandbox serves both"
        );
        let wa = Arc::clone(&worker);
        let ta = tokio::spawn(async move { wa.run(slot_a, &a, Instant::now()).await });
        tokio::time::sleep(Duration::from_millis(700)).await;
        let rb = worker.run(slot_b, &b, Instant::now()).await;
        (ta.await.unwrap(), rb)
    })
}

#[test]
fn concurrent_jobs_cannot_see_or_disturb_each_other() {
    // The victim leaves a secret in a file, its environment and its memory, then waits.
    let victim = Job {
        env: BTreeMap::from([("SECRET".into(), "victim-env-secret".into())]),
        ..py_limited(
            "victim",
            "import os, time\n\
             open('secret.txt', 'w').write('victim-file-secret')\n\
             open('/tmp/victim-tmp', 'w').write('victim-tmp-secret')\n\
             print(os.getpid(), os.getcwd(), os.getuid(), flush=True)\n\
             time.sleep(3)\n\
             print('victim unharmed')\n",
            10_000,
        )
    };
    // The attacker tries every way in it can think of, and reports what worked.
    let attacker = py_limited(
        "attacker",
        "import os, signal\n\
         me = os.getpid()\n\
         found = []\n\
         others = [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != me\n\
         \x20         and os.stat('/proc/' + p).st_uid not in (0, os.getuid())]\n\
         for pid in others:\n\
         \x20   for what in ('environ', 'cmdline', 'mem', 'maps', 'cwd/secret.txt', 'fd/1'):\n\
         \x20       try:\n\
         \x20           data = open('/proc/%d/%s' % (pid, what), 'rb').read(4096)\n\
         \x20           if b'secret' in data: found.append(what)\n\
         \x20       except OSError: pass\n\
         \x20   for sig in (signal.SIGKILL, signal.SIGSTOP):\n\
         \x20       try: os.kill(pid, sig); found.append('signal')\n\
         \x20       except OSError: pass\n\
         for root, dirs, files in os.walk('/work'):\n\
         \x20   for f in files:\n\
         \x20       try: open(os.path.join(root, f)).read(); found.append('file ' + f)\n\
         \x20       except OSError: pass\n\
         try:\n\
         \x20   if 'secret' in open('/tmp/victim-tmp').read(): found.append('tmp')\n\
         except OSError: pass\n\
         for pid in (1, os.getppid()):\n\
         \x20   try: os.kill(pid, signal.SIGKILL); found.append('supervisor signal')\n\
         \x20   except OSError: pass\n\
         try: os.write(3, b'done 1 2\\n{}'); found.append('control channel')\n\
         except OSError: pass\n\
         caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')]\n\
         if caps[0].split()[1].strip('0'): found.append('capabilities')\n\
         for path in ('/tmp/.shardbox', '/tmp/.shardbox/pids'):\n\
         \x20   try: os.listdir(path); found.append(path)\n\
         \x20   except OSError: pass\n\
         print(len(others), sorted(set(found)))\n",
        10_000,
    );
    let (v, a) = run_pair(victim, attacker);
    assert_eq!(a.status, Status::Ok, "{a:?}");
    assert_eq!(
        a.stdout, "1 []\n",
        "the attacker saw the victim and got nothing: {a:?}"
    );
    assert_eq!(v.status, Status::Ok, "{v:?}");
    assert!(v.stdout.ends_with("victim unharmed\n"), "{v:?}");
    let fields: Vec<&str> = v.stdout.split_whitespace().collect();
    assert!(fields[1].starts_with("/work/j"), "{v:?}");
    assert_ne!(fields[2], "0", "jobs never run as root: {v:?}");
}

#[test]
fn each_job_gets_a_fresh_directory_and_user() {
    let code = "import os\nprint(os.listdir('.'), os.getuid() != 0)\nopen('left', 'w').write('x')";
    for i in 0..3 {
        let r = run(h(), py(&format!("fresh{i}"), code)).result;
        assert_eq!(
            (r.status, r.stdout.as_str()),
            (Status::Ok, "[] True\n"),
            "{r:?}"
        );
    }
}

#[test]
fn trust_domains_never_share_a_sandbox() {
    let h = h();
    let worker = Arc::clone(&h.worker);
    let (a, b) = h.rt.block_on(async move {
        let a = worker.acquire_in(TEMPLATE, "tenant-a").await.unwrap();
        let b = worker.acquire_in(TEMPLATE, "tenant-b").await.unwrap();
        let ids = (a.sandbox_id().to_owned(), b.sandbox_id().to_owned());
        worker.discard(a).await;
        worker.discard(b).await;
        ids
    });
    assert_ne!(a, b);
}

#[test]
fn a_sandbox_is_recycled_after_a_job_runs_out_of_memory() {
    let hog = Job {
        memory_mb: Some(128),
        ..py_limited("hog", "s = 'x' * (1 << 30)", 20_000)
    };
    let h = h();
    let worker = Arc::clone(&h.worker);
    let (first, r, next) = h.rt.block_on(async move {
        let prepared = worker.prepare(hog).unwrap();
        let slot = worker.acquire_in(TEMPLATE, "recycle").await.unwrap();
        let first = slot.sandbox_id().to_owned();
        let r = worker.run(slot, &prepared, Instant::now()).await;
        let slot = worker.acquire_in(TEMPLATE, "recycle").await.unwrap();
        let next = slot.sandbox_id().to_owned();
        worker.discard(slot).await;
        (first, r, next)
    });
    assert_eq!(r.status, Status::MemoryLimit, "{r:?}");
    assert_ne!(
        first, next,
        "the sandbox that ran out of memory was not reused"
    );
}

#[test]
fn the_kernel_refuses_forks_past_the_pids_limit() {
    // The template's `pids` limit (64) is a pids cgroup of the job's own inside gVisor: forks
    // past it fail with EAGAIN at once, however fast they come, and the job goes on.
    let code = "import os, time\n\
                kids = []\n\
                while len(kids) < 200:\n\
                \x20   try: pid = os.fork()\n\
                \x20   except OSError as err: print('refused', len(kids), err.errno); break\n\
                \x20   if pid == 0: time.sleep(30); os._exit(0)\n\
                \x20   kids.append(pid)\n\
                print('done')\n";
    let ran = run(h(), py_limited("pids", code, 20_000));
    assert_eq!(ran.result.status, Status::Ok, "{:?}", ran.result);
    let fields: Vec<&str> = ran.result.stdout.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"refused"), "{:?}", ran.result);
    let forked: usize = fields[1].parse().unwrap();
    assert!(
        (50..64).contains(&forked),
        "{forked} forks allowed under a limit of 64"
    );
    assert_eq!(fields[2], libc::EAGAIN.to_string());
    // The sleeping children outlive the job's own process; they end with it.
    assert_cleaned(&ran);
    assert_serves(h());
}

#[test]
fn nothing_a_job_leaves_outside_its_directory_reaches_the_next_job_of_its_user() {
    // Kind: leftovers. Each job looks for entries of its own user id in the sandbox's
    // world-writable directories (left by an earlier job that had the same id), tries to
    // create an entry in /work itself, then leaves files everywhere it may.
    let code = "import os\n\
                uid = os.getuid()\n\
                shared = ['/tmp', '/var/tmp', '/run/lock', '/dev/shm']\n\
                found = [d + '/' + n for d in shared if os.path.isdir(d)\n\
                \x20        for n in os.listdir(d) if os.lstat(d + '/' + n).st_uid == uid]\n\
                try:\n\
                \x20   os.mkdir('/work/squat')\n\
                \x20   work = 'created'\n\
                except PermissionError:\n\
                \x20   work = 'refused'\n\
                left = 0\n\
                for d in shared:\n\
                \x20   try:\n\
                \x20       open('%s/left-%d' % (d, uid), 'w').write('x')\n\
                \x20       os.makedirs('%s/dir-%d/deep' % (d, uid))\n\
                \x20       left += 1\n\
                \x20   except OSError:\n\
                \x20       pass  # not there, or read-only\n\
                print(uid, work, found, left >= 2)";
    let mut seen = Vec::new();
    for i in 0..4 {
        let ran = common::run_all_in(h(), vec![py(&format!("left{i}"), code)], "leftovers");
        let r = &ran[0].result;
        assert_eq!(r.status, Status::Ok, "{r:?}");
        let (uid, rest) = r.stdout.trim().split_once(' ').unwrap();
        assert_eq!(
            rest, "refused [] True",
            "job {i} found leftovers or squatted /work: {r:?}"
        );
        seen.push((ran[0].sandbox_id.clone(), uid.to_owned()));
    }
    // At most two sandboxes serve the domain, and a sandbox gives a freed user id out again:
    // some job ran under a user id that an earlier job of its sandbox had.
    let reused = seen.iter().enumerate().any(|(i, a)| seen[..i].contains(a));
    assert!(reused, "no user id served twice: {seen:?}");
}
