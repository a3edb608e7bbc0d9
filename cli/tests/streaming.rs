//! Streamed text deltas are whole characters and add up to the decoded output, also when a character
//! spans several tokens.

mod common;

use futures::StreamExt;
use strata_client::{Event, GenerateParams};
use strata_harness::{LocalCluster, LocalOptions};
use strata_model::{ModelFile, TextTokenizer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_reassemble_multi_byte_characters() {
    let model = common::default_model();
    let tokenizer = TextTokenizer::load(&ModelFile::open(&model).unwrap()).unwrap();
    let cluster = LocalCluster::start(LocalOptions::new(common::strata(), 1, model))
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    // SmolLM2 answers this with 4-byte emoji, each spread over several byte-level tokens.
    let prompt = "Emoji of a rocket: 🚀. Emoji of a cat:";
    let params = GenerateParams {
        max_tokens: 24,
        ..GenerateParams::default()
    };
    let mut stream = client.generate(prompt, &params).await.unwrap();
    let (mut ids, mut deltas, mut trailing) = (Vec::new(), Vec::new(), String::new());
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            Event::Token(t) => {
                ids.push(t.id);
                deltas.push(t.text);
            }
            Event::Finished(f) => trailing = f.trailing_text,
        }
    }
    let text: String = deltas.concat() + &trailing;
    assert_eq!(text, tokenizer.decode(&ids).unwrap());
    assert!(
        text.chars().any(|c| c.len_utf8() == 4),
        "expected 4-byte characters in {text:?}"
    );
    assert!(
        deltas.iter().any(|d| d.is_empty()),
        "no token ended inside a character: the case was not exercised"
    );
    assert!(
        deltas.iter().all(|d| !d.contains('\u{FFFD}')),
        "a delta split a character: {deltas:?}"
    );
    cluster.stop().await.unwrap();
}

/// `strata-client`'s example, a program with no other strata crate, streams from a real cluster the
/// same text the harness's client collects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_crates_example_streams_a_generation() {
    let cluster = LocalCluster::start(LocalOptions::new(
        common::strata(),
        2,
        common::default_model(),
    ))
    .await
    .unwrap();
    let prompt = "The capital of France is";
    let params = GenerateParams {
        max_tokens: 32,
        ..GenerateParams::default()
    };
    let expected = cluster
        .client()
        .await
        .unwrap()
        .generate_collect(prompt, &params)
        .await
        .unwrap();
    // `cargo test` builds the examples beside the binary it tests.
    let example = common::strata().with_file_name("examples").join("stream");
    assert!(
        example.is_file(),
        "{} is missing: cargo build --release --examples",
        example.display()
    );
    let key = cluster.api_key().expect("a local cluster makes up a key");
    let out = tokio::process::Command::new(&example)
        .args([cluster.url(), prompt])
        .env("STRATA_API_KEY", key.as_str())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the example failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected.text + "\n");
    assert!(
        stderr.contains(&format!("[{} tokens", expected.token_ids.len())),
        "{stderr}"
    );

    // Without the key it is refused, and says why.
    let out = std::process::Command::new(&example)
        .args([cluster.url(), prompt])
        .env_remove("STRATA_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("requires an API key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Wrong use is a usage line, not a panic.
    let out = std::process::Command::new(&example).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: stream URL PROMPT"));
}
