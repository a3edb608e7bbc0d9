//! The batch API: several prompts at once through the pipeline; each output equals its solo output.
//! Run: cargo run --release --example test_batch_inference

mod common;

use std::time::Instant;

use strata_client::GenerateParams;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = common::local_cluster(2).await?;
    let client = cluster.client().await?;
    let prompts: Vec<String> = [
        "The capital of France is",
        "Once upon a time, there was a",
        "def add(a, b):",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let params = GenerateParams {
        max_tokens: 16,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let started = Instant::now();
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(client.generate_collect(p, &params).await?);
    }
    let solo_time = started.elapsed();
    let started = Instant::now();
    let batch = client.generate_batch(&prompts, &params).await;
    let batch_time = started.elapsed();
    for ((p, alone), together) in prompts.iter().zip(&solo).zip(&batch) {
        let together = together.as_ref().map_err(|e| e.to_string())?;
        println!("{p:?} →{:?}", together.text);
        common::check(
            together.token_ids == alone.token_ids,
            "batched output equals the solo output",
        )?;
    }
    println!(
        "one after another {:.0} ms; as a batch {:.0} ms",
        solo_time.as_secs_f64() * 1e3,
        batch_time.as_secs_f64() * 1e3
    );
    // Sequences that share micro-batches each count the shared steps' device time, so together they
    // report more device time than the batch took; run one after another they could not.
    let device: f64 = batch
        .iter()
        .flatten()
        .flat_map(|g| g.stage_forward.iter())
        .map(|d| d.as_secs_f64())
        .sum();
    println!(
        "device time reported by the batch's requests: {:.0} ms",
        device * 1e3
    );
    common::check(
        device > 1.5 * batch_time.as_secs_f64(),
        "the prompts shared micro-batches (ran concurrently)",
    )?;
    cluster.stop().await?;
    Ok(())
}
