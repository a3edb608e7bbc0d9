//! `strata coordinator --cluster FILE` with real worker processes: the file's workers, split and
//! devices are used, and a worker on another device than the file names is refused by name.

mod common;

use std::process::Stdio;
use std::time::Duration;

use strata_harness::local::{WorkerProcess, ANNOUNCE_PREFIX};
use strata_harness::LocalOptions;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn cluster_file(
    dir: &std::path::Path,
    workers: &[&WorkerProcess],
    device: &str,
) -> std::path::PathBuf {
    let mut text = format!(
        "model = {:?}\nlisten = \"127.0.0.1:0\"\nsplit = \"0-12,12-30\"\n",
        common::default_model()
    );
    for w in workers {
        text += &format!(
            "[[workers]]\naddress = {:?}\ndevice = {device:?}\n",
            w.address
        );
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn the_coordinator_runs_the_cluster_file_and_refuses_a_worker_on_the_wrong_device() {
    let options = LocalOptions::new(common::strata(), 2, common::default_model());
    let w1 = WorkerProcess::spawn(&options).await.unwrap();
    let w2 = WorkerProcess::spawn(&options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The workers run on cpu; a file that says cuda:0 is refused before anything is loaded.
    let wrong = cluster_file(dir.path(), &[&w1, &w2], "cuda:0");
    let out = Command::new(common::strata())
        .args(["coordinator", "--no-warmup", "--cluster"])
        .arg(&wrong)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "worker {} runs on cpu, but the cluster says cuda:0",
            w1.address
        )),
        "{stderr}"
    );

    // The right devices: the coordinator serves with the file's split.
    let right = cluster_file(dir.path(), &[&w1, &w2], "cpu");
    let mut coordinator = Command::new(common::strata())
        .args(["coordinator", "--no-warmup", "--announce", "--cluster"])
        .arg(&right)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(coordinator.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the coordinator announces its address")
        .unwrap()
        .unwrap_or_default();
    let address = line
        .strip_prefix(ANNOUNCE_PREFIX)
        .expect("announce line")
        .to_string();
    let client = strata_client::StrataClient::connect(&format!("http://{address}"))
        .await
        .unwrap();
    let info = client.info().await.unwrap();
    let layers: Vec<(u32, u32)> = info
        .stages
        .iter()
        .map(|s| {
            let r = s.layers.unwrap();
            (r.start, r.end)
        })
        .collect();
    assert_eq!(layers, vec![(0, 12), (12, 30)]);
    let _ = coordinator.kill().await;
    w1.stop().await.unwrap();
    w2.stop().await.unwrap();
}
