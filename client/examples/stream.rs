//! Streams one generation from a running coordinator, printing each token as it arrives: a program
//! that depends on `strata-client` alone.
//!
//! ```text
//! cargo run --release -p strata-client --example stream -- http://127.0.0.1:7000 "Once upon a time"
//! cargo run --release -p strata-client --example stream -- host:7000 "Hello" --keys keys/client
//! ```
//! With `--keys DIR` (a directory `strata keys` wrote for a client) it dials with TLS and that API
//! key; otherwise it sends `$STRATA_API_KEY`, when set, over plaintext.

use std::io::Write;

use futures::StreamExt;
use strata_client::{Event, GenerateParams, Security, SecurityFiles, StrataClient};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stream: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (url, prompt, keys) = match args.as_slice() {
        [url, prompt] => (url, prompt, None),
        [url, prompt, flag, dir] if flag == "--keys" => (url, prompt, Some(dir)),
        _ => return Err("usage: stream URL PROMPT [--keys DIR]".into()),
    };
    let security = match keys {
        Some(dir) => Security::load(&SecurityFiles::from_keys_dir(dir.as_ref()))?,
        None => Security::load(&SecurityFiles {
            token: std::env::var("STRATA_API_KEY").ok(),
            ..SecurityFiles::default()
        })?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = StrataClient::connect_with(url, &security).await?;
        let params = GenerateParams {
            max_tokens: 32,
            ..GenerateParams::default()
        };
        let mut stream = client.generate(prompt, &params).await?;
        let mut out = std::io::stdout();
        while let Some(event) = stream.next().await {
            match event? {
                Event::Token(token) => {
                    write!(out, "{}", token.text)?;
                    out.flush()?;
                }
                Event::Finished(end) => {
                    writeln!(out, "{}", end.trailing_text)?;
                    eprintln!(
                        "[{} tokens, {}, time to first token {:.0} ms]",
                        end.generated_tokens,
                        end.reason.as_str(),
                        end.ttft.as_secs_f64() * 1e3
                    );
                }
            }
        }
        Ok(())
    })
}
