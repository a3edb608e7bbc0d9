//! Sequences that share micro-batches get exactly the tokens they get alone.

mod common;

use strata_client::{GenerateParams, LocalCluster, LocalOptions, StrataClient};
use strata_coordinator::plan::SplitSpec;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_match_solo_runs() {
    let cluster = LocalCluster::start(LocalOptions {
        binary: common::strata(),
        workers: 2,
        model: common::default_model(),
        split: SplitSpec::Even,
        warmup: true,
        threads: None,
        worker_args: Vec::new(),
    })
    .await
    .unwrap();
    let client = StrataClient::connect(cluster.url()).await.unwrap();
    let prompts: Vec<String> = [
        "The capital of France is",
        "Once upon a time, there was a little",
        "1, 2, 3, 4,",
        "Write a haiku about the sea:\n",
        "def fibonacci(n):",
        "Q: What is the boiling point of water?\nA:",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let params = GenerateParams {
        max_tokens: 16,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(client.generate_collect(p, &params).await.unwrap().token_ids);
    }
    let batch = client.generate_batch(&prompts, &params).await;
    for ((p, alone), together) in prompts.iter().zip(&solo).zip(batch) {
        assert_eq!(
            &together.unwrap().token_ids,
            alone,
            "{p:?} changed when batched"
        );
    }
    cluster.stop().await.unwrap();
}
