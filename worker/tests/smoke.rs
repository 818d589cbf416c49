//! A first real-runsc check: a plain job runs and prints.

mod common;

use shardbox_proto::Status;

#[test]
fn plain_job() {
    let h = common::harness("smoke");
    let r = common::run(h, common::py("a", "print('hello', 6*7)"));
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.stdout, "hello 42\n");
    println!("{r:?}");
}
