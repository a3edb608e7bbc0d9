//! Streamed text deltas are whole characters and add up to the decoded output, also when a character
//! spans several tokens.

mod common;

use futures::StreamExt;
use strata_client::{Event, GenerateParams, LocalCluster, LocalOptions};
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
