//! Sequences that share micro-batches get exactly the tokens they get alone.

mod common;

use strata_client::{GenerateParams, LocalCluster, LocalOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_match_solo_runs() {
    let cluster = LocalCluster::start(LocalOptions {
        warmup: true,
        ..LocalOptions::new(common::strata(), 2, common::default_model())
    })
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
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
