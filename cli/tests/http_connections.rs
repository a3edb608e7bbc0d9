//! What idle or slow HTTP clients can hold (issue #20's probe: 900 idle connections to the HTTP port
//! were never closed): 2,000 connections that send nothing, or stop mid-header, do not stop a real
//! request, and the server closes every one of them within 30 s.

mod common;

use std::time::{Duration, Instant};

use strata_harness::{LocalCluster, LocalOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 request on a fresh connection; the whole answer.
async fn answer(address: &str, request: &str) -> String {
    let mut tcp = TcpStream::connect(address).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&answer).to_string()
}

/// The status line of [`answer`].
async fn status_line(address: &str, request: &str) -> String {
    let answer = answer(address, request).await;
    answer.lines().next().unwrap_or_default().to_string()
}

/// One local worker and a coordinator serving HTTP; the HTTP port's `host:port`.
async fn with_http() -> (LocalCluster, String) {
    let options = LocalOptions {
        http: Some("127.0.0.1:0".into()),
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    };
    let cluster = LocalCluster::start(options).await.unwrap();
    let url = cluster.http_url().expect("an HTTP port");
    let address = url.trim_start_matches("http://").to_string();
    (cluster, address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_and_do_not_stop_requests() {
    let (cluster, address) = with_http().await;
    let opened = Instant::now();
    let mut idle = Vec::new();
    for i in 0..2000 {
        let mut tcp = TcpStream::connect(&address).await.unwrap();
        // Every tenth stops in the middle of its headers (a slow-headers client).
        if i % 10 == 0 {
            tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        idle.push(tcp);
    }
    eprintln!("2000 connections open in {:?}", opened.elapsed());
    let asked = Instant::now();
    let line = status_line(
        &address,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(line.contains(" 200 "), "{line}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    // Every idle connection is closed by the server (end of stream, or a reset) within 30 s.
    let closes = idle.into_iter().map(|mut tcp| async move {
        let mut buf = [0u8; 512];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return opened.elapsed(),
                // A slow-headers client may get a 408 before the close.
                Ok(_) => {}
            }
        }
    });
    let closed = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(closes))
        .await
        .expect("connections still open 30 s after they went idle");
    let last = closed.iter().max().unwrap();
    eprintln!("every idle connection closed within {last:?} of opening");
    assert!(*last < Duration::from_secs(30), "{last:?}");
    // And the server still serves.
    let line = status_line(
        &address,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(line.contains(" 200 "), "{line}");
    cluster.stop().await.unwrap();
}

/// `/health` answers probes without a key but tells the reason (worker addresses, their errors)
/// only to a caller with one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_without_the_key_says_only_ready_or_not() {
    let (cluster, address) = with_http().await;
    let token = cluster.api_key().expect("a key").as_str().to_string();
    let member = cluster
        .security()
        .token()
        .expect("a token")
        .as_str()
        .to_string();
    let open = answer(
        &address,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(open.starts_with("HTTP/1.1 200"), "{open}");
    assert!(open.ends_with(r#"{"status":"ok"}"#), "{open}");
    let keyed = answer(
        &address,
        &format!(
            "GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(keyed.contains(r#""message":"serving "#), "{keyed}");
    // The cluster's token is no client key: it learns no more than anyone.
    let member = answer(
        &address,
        &format!(
            "GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {member}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(member.ends_with(r#"{"status":"ok"}"#), "{member}");
    cluster.stop().await.unwrap();
}

/// A body over the limit is refused with 413 before it is read whole, and one that trickles in is
/// cut off with 408, both in OpenAI's error shape; the port serves a real request meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_trickled_bodies_are_refused_in_openai_shape() {
    let (cluster, address) = with_http().await;
    let key = cluster.api_key().expect("a key").as_str().to_string();
    let head = |length: usize| {
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        )
    };
    // Trickled: the headers and a few bytes of a 100-byte body, then nothing.
    let trickle_address = address.clone();
    let trickle_head = head(100);
    let trickled = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(&trickle_address).await.unwrap();
        tcp.write_all(trickle_head.as_bytes()).await.unwrap();
        tcp.write_all(b"{\"model\":").await.unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut answer))
            .await
            .expect("no answer within 60 s")
            .unwrap();
        (
            String::from_utf8_lossy(&answer).to_string(),
            started.elapsed(),
        )
    });

    let big = 9 << 20;
    let mut tcp = TcpStream::connect(&address).await.unwrap();
    tcp.write_all(head(big).as_bytes()).await.unwrap();
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..9 {
        // The server may answer and close before all of it is sent.
        if tcp.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains(r#""type":"invalid_request_error""#),
        "{answer}"
    );
    assert!(
        answer.contains("over the limit of 8388608 bytes"),
        "{answer}"
    );

    let url = format!("http://{address}/v1/completions");
    let (status, body) = common::http_post(
        &url,
        &key,
        r#"{"model":"SmolLM2-135M-Instruct.Q4_1","prompt":"Hello","max_tokens":2}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let (answer, waited) = trickled.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within"), "{answer}");
    assert!(waited < Duration::from_secs(40), "{waited:?}");
    eprintln!("a trickled body was cut off after {waited:?}");
    cluster.stop().await.unwrap();
}
