//! Sequences that share micro-batches get exactly the tokens they get alone.

mod common;

use strata_client::GenerateParams;

use strata_harness::{LocalCluster, LocalOptions};

/// Nine prompts of different lengths (one long enough to be prefilled in chunks), started 25 ms
/// apart so they join a running batch at different steps, on workers with the given KV layout.
///
/// `exact`: every one must get exactly its solo tokens (contiguous caches compute each sequence
/// alone, bit for bit). Otherwise (paged caches pad histories to the batch's longest, so sums run in
/// another order and Q4_1's 8-bit activations can round the other way) a sequence may depart from
/// its solo tokens only where the solo run's top two were within 0.3 nats: a near-tie, the
/// reference rule of `reference.rs`.
async fn staggered_requests_match_solo_runs(kv_layout: &str, exact: bool) {
    let cluster = LocalCluster::start(LocalOptions {
        warmup: true,
        worker_args: vec!["--kv-layout".into(), kv_layout.into()],
        ..LocalOptions::new(common::strata(), 2, common::default_model())
    })
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    let long = "Summarize the following text in one sentence. ".repeat(12);
    let prompts: Vec<String> = [
        "The capital of France is",
        "Once upon a time, there was a little",
        "1, 2, 3, 4,",
        "Write a haiku about the sea:\n",
        "def fibonacci(n):",
        "Q: What is the boiling point of water?\nA:",
        "Hi",
        long.as_str(),
        "List three colors: red,",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let params = GenerateParams {
        max_tokens: 16,
        ignore_eos: true,
        top_logprobs: 2,
        ..GenerateParams::default()
    };
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(client.generate_collect(p, &params).await.unwrap());
    }
    let runs = prompts.iter().enumerate().map(|(i, p)| {
        let client = client.clone();
        let params = params.clone();
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(25 * i as u64)).await;
            client.generate_collect(p, &params).await
        }
    });
    let together = futures::future::join_all(runs).await;
    for ((p, alone), together) in prompts.iter().zip(&solo).zip(together) {
        let together = together.unwrap().token_ids;
        if exact {
            assert_eq!(
                together, alone.token_ids,
                "{p:?} changed when batched ({kv_layout} caches)"
            );
            continue;
        }
        assert_eq!(together.len(), alone.token_ids.len(), "{p:?}");
        if let Some(n) = (0..together.len()).find(|&n| together[n] != alone.token_ids[n]) {
            let top = &alone.top_logprobs[n];
            let gap = top[0].1 - top[1].1;
            assert!(
                gap < 0.3,
                "{p:?} departs from its solo run at token {n} where the top-2 gap is {gap:.3} nats: a bug, not a near-tie"
            );
            eprintln!("{p:?}: departs at token {n}, a near-tie of {gap:.3} nats");
        }
    }
    cluster.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_match_solo_runs() {
    staggered_requests_match_solo_runs("contiguous", true).await;
}

/// The layout GPU stages use by default, run here on the CPU: batched decode attention over a
/// shared page pool, with prefill chunks and decode rows in the same steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_match_solo_runs_with_paged_caches() {
    staggered_requests_match_solo_runs("paged", false).await;
}

#[test]
fn prompts_file_prints_one_json_line_per_prompt_matching_solo_runs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.txt");
    let prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,"];
    std::fs::write(
        &file,
        format!("{}\n\n{}\n{}\n", prompts[0], prompts[1], prompts[2]),
    )
    .unwrap();
    let model = common::default_model();
    let model = model.to_str().unwrap();
    let out = common::run(&[
        "generate",
        "--local",
        "1",
        "--model",
        model,
        "--max-tokens",
        "8",
        "--prompts-file",
        file.to_str().unwrap(),
    ]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one line per non-empty prompt");
    for (i, (line, prompt)) in lines.iter().zip(prompts).enumerate() {
        assert_eq!(line["index"], i);
        assert_eq!(line["prompt"], prompt);
        let solo = common::generate_json(&[
            "--local",
            "1",
            "--model",
            model,
            "--max-tokens",
            "8",
            "--prompt",
            prompt,
        ]);
        assert_eq!(common::ids(line), common::ids(&solo), "{prompt:?}");
    }
}

/// Two CPU workers that say they share one device (`--physical-device`, what two CUDA workers on
/// one GPU report by themselves): eight sequences decode as one micro-batch instead of one per
/// stage, so each stage runs about one step per token instead of two, and every sequence still
/// gets exactly its solo tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_sharing_a_device_decode_as_one_micro_batch() {
    const TOKENS: usize = 24;
    let cluster = LocalCluster::start(LocalOptions {
        warmup: true,
        threads: Some(1),
        worker_args: ["--kv-layout", "contiguous", "--physical-device", "test-gpu"]
            .map(String::from)
            .to_vec(),
        ..LocalOptions::new(common::strata(), 2, common::default_model())
    })
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    let info = client.info().await.unwrap();
    assert!(
        info.stages.iter().all(|s| s.physical_device == "test-gpu"),
        "{:?}",
        info.stages
    );
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Count from {i}: {i}, {},", i + 1))
        .collect();
    let params = GenerateParams {
        max_tokens: TOKENS as u32,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(client.generate_collect(p, &params).await.unwrap().token_ids);
    }
    let steps = |info: &strata_proto::v1::CoordinatorInfo| info.stages[0].steps_total;
    let before = steps(&client.info().await.unwrap());
    let together = client.generate_batch(&prompts, &params).await;
    let taken = steps(&client.info().await.unwrap()) - before;
    eprintln!("{taken} steps on the first stage for {TOKENS} tokens of 8 sequences");
    for ((p, alone), together) in prompts.iter().zip(&solo).zip(together) {
        assert_eq!(
            &together.unwrap().token_ids,
            alone,
            "{p:?} changed when batched"
        );
    }
    // One micro-batch per stage would take ~2 steps per token (48); one in flight takes one per
    // token, plus the prompts' steps (up to one per stage) and the drain before they merge.
    assert!(
        taken <= TOKENS as u64 + 6,
        "{taken} steps on the first stage for {TOKENS} tokens of 8 sequences"
    );
    cluster.stop().await.unwrap();
}

/// `strata bench --single-process --replicas N`: every stream goes to one replica and gets its
/// tokens; a level with fewer streams than replicas is refused instead of measuring idle ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_process_replicas_share_the_streams() {
    use strata_harness::bench::throughput_single;
    use strata_harness::single_process::SingleProcess;

    let model = common::default_model();
    let replicas = vec![
        SingleProcess::load(&model, 1).await.unwrap(),
        SingleProcess::load(&model, 1).await.unwrap(),
    ];
    let row = throughput_single(&replicas, "2 replicas", 5, 6)
        .await
        .unwrap();
    assert_eq!(row.concurrency, 5);
    assert_eq!(row.generated_tokens, 5 * 6, "{row:?}");
    assert!(row.decode_aggregate_tok_s > 0.0, "{row:?}");
    let err = throughput_single(&replicas, "2 replicas", 1, 6)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("2 replicas"), "{err}");
}
