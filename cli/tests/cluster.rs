//! The real thing: `strata worker` and `strata coordinator` processes on loopback ports, a Rust client
//! streaming tokens, and a Python client (grpcio stubs generated from proto/) getting the same tokens.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use strata_client::{Event, GenerateParams, StrataClient};
use strata_harness::local::{WorkerProcess, ANNOUNCE_PREFIX};
use strata_harness::LocalOptions;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn worker_options() -> LocalOptions {
    LocalOptions {
        warmup: true,
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    }
}

/// Starts `strata coordinator` over `workers` and returns it with its address.
async fn start_coordinator(workers: &[String], extra: &[&str]) -> (tokio::process::Child, String) {
    let mut child = Command::new(common::strata())
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--announce",
            "--workers",
            &workers.join(","),
        ])
        .arg("--model")
        .arg(common::default_model())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start coordinator");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let address = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(a) = line.strip_prefix(ANNOUNCE_PREFIX) {
                return a.trim().to_string();
            }
        }
        panic!("the coordinator exited before listening");
    })
    .await
    .expect("coordinator start");
    (child, address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_coordinator_processes_serve_rust_and_python_clients() {
    let options = worker_options();
    let w1 = WorkerProcess::spawn(&options).await.unwrap();
    let w2 = WorkerProcess::spawn(&options).await.unwrap();
    let workers = vec![w1.address.clone(), w2.address.clone()];
    let (mut coordinator, address) = start_coordinator(&workers, &["--split", "0-12,12-30"]).await;

    let client = StrataClient::connect(&address).await.unwrap();
    let info = client.info().await.unwrap();
    let layers: Vec<(u32, u32)> = info
        .stages
        .iter()
        .map(|s| {
            let l = s.layers.unwrap();
            (l.start, l.end)
        })
        .collect();
    assert_eq!(layers, vec![(0, 12), (12, 30)]);
    assert_eq!(info.model.unwrap().num_layers, 30);

    // Streaming: the first token arrives while later ones are still being computed.
    let prompt = "Once upon a time, there was a little";
    let params = GenerateParams {
        max_tokens: 24,
        ..GenerateParams::default()
    };
    let started = Instant::now();
    let mut stream = client.generate(prompt, &params).await.unwrap();
    let mut arrivals = Vec::new();
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut finished = None;
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            Event::Token(t) => {
                arrivals.push(started.elapsed());
                ids.push(t.id);
                text.push_str(&t.text);
            }
            Event::Finished(f) => {
                text.push_str(&f.trailing_text);
                finished = Some((f, started.elapsed()));
            }
        }
    }
    let (finished, done) = finished.expect("a final message");
    assert_eq!(ids.len(), 24);
    assert_eq!(finished.generated_tokens, 24);
    assert!(
        arrivals[0] < done && arrivals[0] < arrivals[23],
        "tokens must stream: {arrivals:?}"
    );
    assert!(
        done - arrivals[0] > Duration::from_millis(50),
        "the first token came only at the end"
    );
    assert!(text.starts_with(" girl named Emma"), "{text:?}");

    // Every sequence was released on every stage.
    let info = client.info().await.unwrap();
    assert!(
        info.stages.iter().all(|s| s.active_sequences == 0),
        "{info:?}"
    );

    // A second client in another language gets the same tokens.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpc_client.py");
    let out = Command::new("python3")
        .args([script, &address, prompt, "24"])
        .output()
        .await
        .expect("run python3");
    assert!(
        out.status.success(),
        "the Python client failed (install grpcio and grpcio-tools: pip install -r cli/tests/python/requirements.txt):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let py_ids: Vec<u32> = py["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(py_ids, ids, "Python and Rust clients disagree");
    assert_eq!(py["text"].as_str().unwrap(), text);

    coordinator.start_kill().unwrap();
    w1.stop().await.unwrap();
    w2.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_names_an_unreachable_worker() {
    // Port 1 on loopback: nothing listens there.
    let started = Instant::now();
    let out = Command::new(common::strata())
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "127.0.0.1:1",
        ])
        .arg("--model")
        .arg(common::default_model())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("no hang")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("127.0.0.1:1") && stderr.contains("unreachable"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Sends SIGTERM to `pid`.
fn terminate(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Streams 64 tokens, sending SIGTERM to `pid` after the 5th; returns the tokens and the error, if
/// the stream ended with one.
async fn generate_through_sigterm(
    client: &StrataClient,
    pid: u32,
) -> (usize, Option<strata_client::ClientError>) {
    let params = GenerateParams {
        max_tokens: 64,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let mut stream = client
        .generate("The capital of France is", &params)
        .await
        .unwrap();
    let mut tokens = 0;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Token(_)) => {
                tokens += 1;
                if tokens == 5 {
                    terminate(pid);
                }
            }
            Ok(Event::Finished(_)) => return (tokens, None),
            Err(e) => return (tokens, Some(e)),
        }
    }
    (tokens, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_exits_0() {
    let options = worker_options();
    let w1 = WorkerProcess::spawn(&options).await.unwrap();
    let mut w2 = WorkerProcess::spawn(&options).await.unwrap();
    let workers = vec![w1.address.clone(), w2.address.clone()];

    // The coordinator: the running stream completes, then the process exits 0.
    let (mut coordinator, address) = start_coordinator(&workers, &[]).await;
    let client = StrataClient::connect(&address).await.unwrap();
    let (tokens, error) = generate_through_sigterm(&client, coordinator.id().unwrap()).await;
    assert!(error.is_none(), "in-flight request broke: {error:?}");
    assert_eq!(tokens, 64);
    let status = tokio::time::timeout(Duration::from_secs(30), coordinator.wait())
        .await
        .expect("the coordinator did not exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "coordinator exit: {status}");
    assert!(
        StrataClient::connect(&address).await.is_err(),
        "still accepting after SIGTERM"
    );

    // A worker: its step in flight completes; the request then ends with a clear UNAVAILABLE
    // naming the stage (or completes), and the worker exits 0.
    let (_coordinator, address) = start_coordinator(&workers, &[]).await;
    let client = StrataClient::connect(&address).await.unwrap();
    let (tokens, error) = generate_through_sigterm(&client, w2.pid().unwrap()).await;
    if let Some(error) = error {
        let text = error.to_string();
        assert!(
            text.contains("Unavailable") || text.contains("unavailable"),
            "after {tokens} tokens: {text}"
        );
        assert!(text.contains(&w2.address), "{text}");
    }
    let status = tokio::time::timeout(Duration::from_secs(30), w2.wait())
        .await
        .expect("the worker did not exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "worker exit: {status}");
    w1.stop().await.unwrap();
}
