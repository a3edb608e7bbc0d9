//! The basic pipeline: a 2-stage local cluster generates text, and the tokens equal a 1-stage run.
//! Run: cargo run --release --example test_pipeline

mod common;

use strata_client::GenerateParams;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prompt = "The quick brown fox";
    let params = GenerateParams {
        max_tokens: 24,
        ..GenerateParams::default()
    };
    let mut outputs = Vec::new();
    for workers in [1, 2] {
        let cluster = common::local_cluster(workers).await?;
        println!("{workers} stage(s): {:?}", cluster.plan());
        let client = cluster.client().await?;
        let g = client.generate_collect(prompt, &params).await?;
        println!("  {prompt}{}", g.text);
        println!(
            "  {} tokens, TTFT {:.0} ms, {:.1} tokens/s",
            g.token_ids.len(),
            g.ttft.as_secs_f64() * 1e3,
            g.decode_tokens_per_s()
        );
        outputs.push(g.token_ids);
        cluster.stop().await?;
    }
    common::check(!outputs[0].is_empty(), "the pipeline generated tokens")?;
    common::check(
        outputs[0] == outputs[1],
        "2 stages give exactly the tokens of 1 stage",
    )?;
    Ok(())
}
