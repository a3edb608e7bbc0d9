//! The streaming API: tokens are printed as they arrive; the first arrives long before the last, and
//! the text deltas add up to the decoded output even across multi-byte characters.
//! Run: cargo run --release --example test_streaming_inference

mod common;

use std::io::Write;
use std::time::Instant;

use futures::StreamExt;
use strata_client::{Event, GenerateParams};
use strata_model::{ModelFile, TextTokenizer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = common::local_cluster(2).await?;
    let client = cluster.client().await?;
    let prompt = "Translate to French: I love coffee and cake.\nFrench:";
    let params = GenerateParams {
        max_tokens: 32,
        ..GenerateParams::default()
    };
    let started = Instant::now();
    let mut stream = client.generate(prompt, &params).await?;
    let (mut first, mut last) = (None, None);
    let (mut text, mut ids) = (String::new(), Vec::new());
    print!("{prompt}");
    while let Some(event) = stream.next().await {
        match event? {
            Event::Token(t) => {
                first.get_or_insert(started.elapsed());
                last = Some(started.elapsed());
                print!("{}", t.text);
                std::io::stdout().flush()?;
                text.push_str(&t.text);
                ids.push(t.id);
            }
            Event::Finished(f) => text.push_str(&f.trailing_text),
        }
    }
    println!();
    let (first, last) = (first.ok_or("no tokens")?, last.ok_or("no tokens")?);
    println!(
        "first token after {:.0} ms, last after {:.0} ms",
        first.as_secs_f64() * 1e3,
        last.as_secs_f64() * 1e3
    );
    common::check(
        ids.len() > 1 && first < last,
        "tokens arrived one by one, the first before the last",
    )?;
    let model = ModelFile::open(&strata_harness::model_cache::fetch_default_model(false)?)?;
    let decoded = TextTokenizer::load(&model)?.decode(&ids)?;
    common::check(
        text == decoded,
        "the streamed deltas add up to the decoded text",
    )?;
    cluster.stop().await?;
    Ok(())
}
