//! Cancellation frees caches on every stage at once; a flood past the admission bounds is refused
//! with RESOURCE_EXHAUSTED while the admitted requests come out right and the workers live on; a
//! burst larger than one Forward a worker accepts queues and is served in parts.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use strata_client::{ClientError, Event, GenerateParams, StrataClient};
use strata_coordinator::plan::SplitSpec;
use strata_coordinator::scheduler::SchedulerLimits;
use strata_harness::{LocalCluster, LocalOptions};

async fn active_per_stage(client: &StrataClient) -> Vec<u32> {
    client
        .info()
        .await
        .unwrap()
        .stages
        .iter()
        .map(|s| s.active_sequences)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_frees_its_caches_on_every_stage() {
    let cluster = LocalCluster::start(LocalOptions::new(
        common::strata(),
        2,
        common::default_model(),
    ))
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    let params = GenerateParams {
        max_tokens: 500,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let mut stream = client
        .generate("Tell me a long story about the sea.", &params)
        .await
        .unwrap();
    let mut tokens = 0;
    while let Some(event) = stream.next().await {
        if let Event::Token(_) = event.unwrap() {
            tokens += 1;
            if tokens == 3 {
                break;
            }
        }
    }
    assert_eq!(
        active_per_stage(&client).await,
        vec![1, 1],
        "the sequence holds caches while it runs"
    );
    drop(stream);
    let dropped = Instant::now();
    // One decode step is ~20 ms here; allow a generous bound for a loaded machine.
    loop {
        if active_per_stage(&client).await == vec![0, 0] {
            break;
        }
        assert!(
            dropped.elapsed() < Duration::from_secs(2),
            "caches still held {:?} after the client left",
            dropped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "caches freed {:?} after the stream was dropped",
        dropped.elapsed()
    );
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_bounds_is_refused_and_the_rest_is_right() {
    let options = LocalOptions {
        scheduler: SchedulerLimits {
            max_active: 2,
            max_queued: 2,
            ..SchedulerLimits::default()
        },
        ..LocalOptions::new(common::strata(), 2, common::default_model())
    };
    let cluster = LocalCluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    // Long enough that all requests arrive while the first ones still run.
    let params = GenerateParams {
        max_tokens: 48,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("Request number {i} asks:"))
        .collect();
    let results = client.generate_batch(&prompts, &params).await;
    let mut refused = 0;
    let mut served = Vec::new();
    for (prompt, result) in prompts.iter().zip(results) {
        match result {
            Ok(g) => served.push((prompt.clone(), g.token_ids)),
            Err(ClientError::Status(s)) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(s.message().contains("waiting"), "{}", s.message());
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    eprintln!("{refused} refused, {} served", served.len());
    assert!(
        refused > 0,
        "16 requests at once against 2 active + 2 queued should refuse some"
    );
    assert!(
        served.len() >= 4,
        "at least the bounds' worth must be served, got {}",
        served.len()
    );
    for (prompt, ids) in served {
        let alone = client.generate_collect(&prompt, &params).await.unwrap();
        assert_eq!(alone.token_ids, ids, "{prompt:?}");
    }
    assert_eq!(active_per_stage(&client).await, vec![0, 0]);
    cluster.stop().await.unwrap();
}

/// Issue #20's first probe, scaled to this machine: 64 prompts of ~600 tokens against a worker
/// that takes 16,384 positions per Forward all failed, because micro-batches were built past it.
/// Here 24 prompts of ~150 tokens (3,600 positions) go to a worker that takes 256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_a_workers_forward_limit_queues_and_is_served_in_parts() {
    let options = LocalOptions {
        worker_args: vec!["--max-batch-rows".into(), "256".into()],
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    };
    let cluster = LocalCluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let params = GenerateParams {
        max_tokens: 4,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let subjects = ["the sea", "a mountain", "the city", "an old clock"];
    let distinct: Vec<String> = subjects
        .iter()
        .map(|s| format!("Write about {s}. {}", "Think of every detail. ".repeat(30)))
        .collect();
    for prompt in &distinct {
        let n = client.tokenize(prompt).await.unwrap().len();
        assert!((140..256).contains(&n), "{n} prompt tokens");
    }
    let prompts: Vec<String> = (0..24).map(|i| distinct[i % 4].clone()).collect();
    let started = Instant::now();
    let results = client.generate_batch(&prompts, &params).await;
    eprintln!("24 prompts served in {:?}", started.elapsed());
    let mut alone = Vec::new();
    for prompt in &distinct {
        alone.push(
            client
                .generate_collect(prompt, &params)
                .await
                .unwrap()
                .token_ids,
        );
    }
    for (i, result) in results.into_iter().enumerate() {
        let got = result.unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(
            got.token_ids,
            alone[i % 4],
            "request {i} differs from its solo run"
        );
    }
    assert_eq!(active_per_stage(&client).await, vec![0]);
    cluster.stop().await.unwrap();
}

/// Two prompts that fit the worker's KV bound one at a time but not in one step: the step is
/// refused (before anything changes) and each retries alone, instead of both failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_refusal_of_a_shared_step_fails_no_batch_mate() {
    let options = LocalOptions {
        // SmolLM2 in f32 needs 45 KiB of KV per position, and a step may allocate twice its
        // size: 64 MiB takes ~728 new positions at once, one 450-token prompt but not two.
        worker_args: vec!["--max-cache-mib".into(), "64".into()],
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    };
    kv_refusal_retries_each_batch_mate_alone(options, 400).await;
}

/// The same refusal from the last of two stages, after the first has already appended the
/// step's positions: the batch-mates start again alone and come out as they do alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_refusal_at_a_later_stage_fails_no_batch_mate() {
    let options = LocalOptions {
        // The last stage holds 24 of SmolLM2's 30 layers, 36 KiB of f32 KV per position, and a
        // step may allocate twice its size: 56 MiB takes ~796 new positions at once, one
        // 450-token prompt but not two, and still one more after another is cached. The first
        // stage (9 KiB per position) takes both.
        split: SplitSpec::Explicit(vec![0..6, 6..30]),
        worker_args: vec!["--max-cache-mib".into(), "56".into()],
        ..LocalOptions::new(common::strata(), 2, common::default_model())
    };
    kv_refusal_retries_each_batch_mate_alone(options, 100).await;
}

/// Sends two ~450-token prompts together while one stream per stage decodes `decode` tokens
/// (so every micro-batch slot is taken, and both prompts go into the next step together), and
/// checks that both come out as they do alone and the streams keep going.
async fn kv_refusal_retries_each_batch_mate_alone(options: LocalOptions, decode: usize) {
    let stages = options.workers;
    let cluster = LocalCluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let params = GenerateParams {
        max_tokens: 1,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let prompts: Vec<String> = ["the sea", "a mountain"]
        .iter()
        .map(|s| format!("Write about {s}. {}", "Think of every detail. ".repeat(90)))
        .collect();
    for prompt in &prompts {
        let n = client.tokenize(prompt).await.unwrap().len();
        assert!((400..500).contains(&n), "{n} prompt tokens");
    }
    let long = GenerateParams {
        max_tokens: decode as u32,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let mut streams = Vec::new();
    for topic in ["the sea", "the sky"].iter().take(stages) {
        let mut stream = client
            .generate(&format!("Tell me about {topic}."), &long)
            .await
            .unwrap();
        for _ in 0..3 {
            stream.next().await.unwrap().unwrap();
        }
        streams.push(stream);
    }
    let results = client.generate_batch(&prompts, &params).await;
    for (prompt, result) in prompts.iter().zip(results) {
        let got = result.unwrap_or_else(|e| panic!("a batch-mate failed: {e}"));
        let alone = client.generate_collect(prompt, &params).await.unwrap();
        assert_eq!(got.token_ids, alone.token_ids);
    }
    for mut stream in streams {
        let mut streamed = 3;
        while let Some(event) = stream.next().await {
            if let Event::Token(_) = event.expect("the decoding stream kept going") {
                streamed += 1;
            }
        }
        assert_eq!(streamed, decode);
    }
    assert_eq!(active_per_stage(&client).await, vec![0; stages]);
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_grpc_timeout_ends_with_deadline_exceeded_and_frees_its_caches() {
    use strata_proto::v1;
    let cluster = LocalCluster::start(LocalOptions::new(
        common::strata(),
        2,
        common::default_model(),
    ))
    .await
    .unwrap();
    let channel = cluster
        .client_security()
        .connect(cluster.url(), Duration::from_secs(5))
        .await
        .unwrap();
    let mut raw = v1::coordinator_client::CoordinatorClient::new(channel);
    let mut request = tonic::Request::new(v1::GenerateRequest {
        prompt: "Tell me a long story about the sea.".into(),
        max_tokens: 4000,
        ignore_eos: true,
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(700));
    let started = Instant::now();
    let mut stream = raw.generate(request).await.unwrap().into_inner();
    let mut tokens = 0;
    let status = loop {
        match stream.next().await {
            Some(Ok(_)) => tokens += 1,
            Some(Err(status)) => break status,
            None => panic!("the stream ended without an error after {tokens} tokens"),
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("ran out of time"), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(tokens > 0 && tokens < 4000);
    let client = cluster.client().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while active_per_stage(&client).await != vec![0, 0] {
        assert!(
            Instant::now() < deadline,
            "caches not freed after the deadline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop().await.unwrap();
}
