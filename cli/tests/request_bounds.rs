//! What a careless or hostile client's requests cost everyone else (issue #20): 100,000 chat
//! messages, a 1 MiB prompt of one repeated character and 16 concurrent 1 MiB `Tokenize` calls are
//! refused or served while the coordinator's memory stays bounded and a concurrent stream keeps
//! its pace.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use strata_harness::{LocalCluster, LocalOptions};
use strata_proto::v1;

/// This process's resident memory (the coordinator runs in it; the workers do not), in MiB.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024
}

/// The longest gap between tokens of a greedy stream of `tokens` tokens.
async fn largest_gap(
    client: &mut v1::coordinator_client::CoordinatorClient<strata_transport::AuthChannel>,
    tokens: u32,
) -> Duration {
    let request = v1::GenerateRequest {
        prompt: "Tell me a long story about the sea.".into(),
        max_tokens: tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut last = None;
    let mut gap = Duration::ZERO;
    while let Some(event) = stream.next().await {
        event.unwrap();
        let now = Instant::now();
        if let Some(before) = last {
            gap = gap.max(now - before);
        }
        last = Some(now);
    }
    gap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_bounded_and_a_stream_keeps_its_pace() {
    let cluster = LocalCluster::start(LocalOptions::new(
        common::strata(),
        1,
        common::default_model(),
    ))
    .await
    .unwrap();
    let channel = cluster
        .client_security()
        .connect(cluster.url(), Duration::from_secs(5))
        .await
        .unwrap();
    let client = v1::coordinator_client::CoordinatorClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let usual = largest_gap(&mut client.clone(), 48).await;

    let before = rss_mib();
    let peak = Arc::new(AtomicU64::new(before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_mib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let during = tokio::spawn({
        let mut client = client.clone();
        async move { largest_gap(&mut client, 48).await }
    });

    // 100,000 empty chat messages: refused by count, before any rendering.
    let many = v1::GenerateRequest {
        messages: (0..100_000)
            .map(|_| v1::ChatMessage {
                role: "user".into(),
                content: String::new(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let status = client.clone().generate(many).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("100000 chat messages"),
        "{status:?}"
    );

    // A 1 MiB prompt of one character: tokenized off the async threads, then refused by length.
    let long = v1::GenerateRequest {
        prompt: "a".repeat(1 << 20),
        ..Default::default()
    };
    let status = client.clone().generate(long).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("context length"), "{status:?}");

    // 16 Tokenize calls of 1 MiB at once: each served.
    let calls = (0..16).map(|_| {
        let mut client = client.clone();
        async move {
            let text = "a".repeat(1 << 20);
            client
                .tokenize(v1::TokenizeRequest {
                    text,
                    parse_special: false,
                })
                .await
                .map(|r| r.into_inner().ids.len())
        }
    });
    for served in futures::future::join_all(calls).await {
        assert_eq!(served.unwrap(), 1 << 18);
    }

    let gap = during.await.unwrap();
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let rise = peak.load(Ordering::Relaxed).saturating_sub(before);
    eprintln!("largest gap alone {usual:?}, beside the flood {gap:?}; RSS rose {rise} MiB at most");
    assert!(rise < 100, "the coordinator's memory rose {rise} MiB");
    assert!(
        gap < usual * 2 + Duration::from_millis(50),
        "a stream's largest gap went from {usual:?} to {gap:?}"
    );
    cluster.stop().await.unwrap();
}
