//! The state a cut-off `runsc create` or `restore` leaves: an empty state file that real runsc
//! lists but refuses to kill or delete. The driver's delete removes it.

use std::path::PathBuf;

use shardbox_worker::config::RunscConfig;
use shardbox_worker::runsc::Runsc;

fn root(name: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/var/tmp/shardbox-test-runsc-state/{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn an_empty_state_file_is_removed_by_delete() {
    let root = root("empty");
    let runsc = Runsc::new(&RunscConfig::default(), root.clone());
    let id = "sb1-python-000000001";
    for ext in ["state", "lock"] {
        std::fs::write(root.join(format!("{id}_sandbox:{id}.{ext}")), b"").unwrap();
    }
    assert_eq!(runsc.list().await.unwrap(), vec![id.to_owned()]);
    // runsc itself cannot read it.
    assert!(runsc.kill(id).await.is_err());

    runsc.delete(id).await.unwrap();
    assert!(!runsc.has_state(id));
    assert_eq!(runsc.list().await.unwrap(), Vec::<String>::new());
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
}
