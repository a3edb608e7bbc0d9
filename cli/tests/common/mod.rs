//! Helpers shared by the end-to-end tests: the binary, the default model, the reference outputs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The `strata` binary cargo built for these tests.
pub fn strata() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_strata"))
}

/// The default model, fetched into the cache if missing.
pub fn default_model() -> PathBuf {
    strata_harness::model_cache::fetch_default_model(false)
        .expect("the default model (run `strata fetch-model`)")
}

/// llama.cpp's reference outputs for the default model (see [`reference_named`]).
pub fn reference() -> Value {
    reference_named("smollm2.json")
}

/// Runs `strata ARGS`, asserting success, and returns the output.
pub fn run(args: &[&str]) -> Output {
    let output = Command::new(strata())
        .args(args)
        .output()
        .expect("run strata");
    assert!(
        output.status.success(),
        "strata {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `strata generate ... --json` and parses its JSON line.
pub fn generate_json(args: &[&str]) -> Value {
    let mut all = vec!["generate", "--json"];
    all.extend_from_slice(args);
    let output = run(&all);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("bad JSON from strata {all:?}: {e}: {stdout}"))
}

/// The `token_ids` of a `--json` result.
pub fn ids(v: &Value) -> Vec<u64> {
    v["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// A model strata fetches by name (into the cache outside the clone), fetched if missing.
pub fn known_model(name: &str) -> PathBuf {
    let known = strata_harness::model_cache::KnownModel::by_name(name)
        .unwrap_or_else(|| panic!("{name} is not a known model"));
    strata_harness::model_cache::fetch(known, false)
        .unwrap_or_else(|e| panic!("{name}: {e} (run `strata fetch-model {name}`)"))
}

/// A reference file of llama.cpp's outputs: `../shared/reference/FILE` beside the checkout when
/// present (it may hold newer prompts), else the copy in `tests/data`.
pub fn reference_named(file: &str) -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let shared = root.join("../shared/reference").join(file);
    let path = if shared.exists() {
        shared
    } else {
        root.join("cli/tests/data").join(file)
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

/// Every (text, ids) pair of a reference: its tokenization cases and its prompts.
pub fn tokenization_cases(r: &Value) -> Vec<(String, Vec<u64>)> {
    let list = |v: &Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let mut cases: Vec<(String, Vec<u64>)> = r["tokenization"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["text"].as_str().unwrap().to_string(), list(&t["ids"])))
        .collect();
    for p in r["prompts"].as_array().unwrap() {
        cases.push((p["text"].as_str().unwrap().into(), list(&p["prompt_ids"])));
    }
    cases
}

/// Asserts `strata tokenize` gives llama.cpp's ids on every case of the reference.
pub fn assert_tokenizer_matches(model: &str, r: &Value) {
    let cases = tokenization_cases(r);
    assert!(cases.len() >= 5);
    for (text, want) in cases {
        let out = run(&["tokenize", "--model", model, "--json", &text]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let got: Vec<u64> = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(got, want, "tokenization of {text:?}");
    }
}

/// The reference rule on one generation (`--json` output `out`) of reference prompt `p`: the first
/// `exact_prefix` ids equal llama.cpp's; a later departure must be at a near-tie of our own logits
/// (top-2 gap < 0.3 nats).
pub fn assert_follows_reference(p: &Value, out: &Value) {
    let text = p["text"].as_str().unwrap();
    let want: Vec<u64> = p["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let exact = p["exact_prefix"].as_u64().unwrap() as usize;
    let got = ids(out);
    assert_eq!(out["prompt_ids"], p["prompt_ids"], "prompt ids of {text:?}");
    match got.iter().zip(&want).position(|(a, b)| a != b) {
        // After a departure the contexts differ, so either may stop (end of sequence) first.
        None => assert_eq!(got.len(), want.len(), "{text:?}: {got:?}"),
        Some(n) => {
            assert!(n >= exact, "{text:?} departs from llama.cpp at token {n}, inside the exact prefix {exact}: {got:?} vs {want:?}");
            let top = &out["top_logprobs"][n];
            let gap = top[0]["logprob"].as_f64().unwrap() - top[1]["logprob"].as_f64().unwrap();
            assert!(gap < 0.3, "{text:?} departs at token {n} where our top-2 gap is {gap:.3} nats (≥ 0.3): a bug, not a near-tie");
            eprintln!("{text:?}: departs at token {n} (exact prefix {exact}) at a near-tie of {gap:.3} nats");
        }
    }
    // The reported top-1 is the token chosen, and log-probabilities are normalized.
    for (i, top) in out["top_logprobs"].as_array().unwrap().iter().enumerate() {
        assert_eq!(top.as_array().unwrap().len(), 5);
        assert_eq!(top[0]["id"].as_u64(), Some(got[i]));
        assert!(top[0]["logprob"].as_f64().unwrap() <= 0.0);
    }
}

/// Runs a Python check of `tests/python/` against this build's binary and asserts that unittest ran
/// `tests` tests and passed (a skipped or missing test fails too).
pub fn run_python_check(script: &str, tests: usize, what: &str) {
    run_python_check_with(script, tests, what, &[]);
}

/// [`run_python_check`] with more environment variables for the script.
pub fn run_python_check_with(script: &str, tests: usize, what: &str, env: &[(&str, &Path)]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = Command::new("python3")
        .arg(&path)
        .env("STRATA_BIN", strata())
        .envs(env.iter().copied())
        .output()
        .expect("run python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed (install the clients: pip install -r cli/tests/python/requirements.txt):\n{stderr}"
    );
    let ran = if tests == 1 {
        "Ran 1 test ".to_string()
    } else {
        format!("Ran {tests} tests")
    };
    assert!(stderr.contains(&ran) && stderr.contains("\nOK"), "{stderr}");
}

/// One HTTP/1.1 request to `url` (`http://host:port/path`) on a fresh connection, with `key` as
/// the bearer credential: the status code and the body.
pub async fn http_request(method: &str, url: &str, key: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (address, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("no answer within 60 s")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub async fn http_post(url: &str, key: &str, body: &str) -> (u16, String) {
    http_request("POST", url, key, body).await
}

pub async fn http_get(url: &str, key: &str) -> (u16, String) {
    http_request("GET", url, key, "").await
}

/// A worker process started with `options` (no token, no TLS) and a raw gRPC client to it.
pub async fn raw_worker(
    options: &strata_harness::LocalOptions,
) -> (
    strata_harness::local::WorkerProcess,
    strata_proto::v1::worker_client::WorkerClient<tonic::transport::Channel>,
) {
    let worker = strata_harness::local::WorkerProcess::spawn(options)
        .await
        .unwrap();
    let client = strata_proto::v1::worker_client::WorkerClient::connect(format!(
        "http://{}",
        worker.address
    ))
    .await
    .unwrap();
    (worker, client)
}

/// `got` equals `want`'s tokens, or departs from them first where `want` (generated with
/// `top_logprobs` ≥ 2) had its top two within 0.3 nats: a near-tie, where two computations that
/// round differently may legitimately part (the rule of `../shared/reference/`).
pub fn assert_same_or_near_tie(what: &str, got: &[u32], want: &strata_client::Generation) {
    let Some(n) = got.iter().zip(&want.token_ids).position(|(a, b)| a != b) else {
        assert_eq!(
            got.len(),
            want.token_ids.len(),
            "{what}: {got:?} vs {:?}",
            want.token_ids
        );
        return;
    };
    let top = &want.top_logprobs[n];
    assert!(
        top.len() >= 2,
        "{what}: the reference has no alternatives at token {n}"
    );
    let gap = top[0].1 - top[1].1;
    assert!(
        gap < 0.3,
        "{what}: departs at token {n} where the reference's top-2 gap is {gap:.3} nats: a bug, \
         not a near-tie ({got:?} vs {:?})",
        want.token_ids
    );
    eprintln!("{what}: departs at token {n} at a near-tie of {gap:.3} nats");
}

/// An in-process coordinator's settings over `workers` on the default model, as the end-to-end
/// tests use it: no TLS, open to every client, stages split evenly, no spares, no warmup.
pub fn coordinator_config(
    workers: &[&strata_harness::local::WorkerProcess],
) -> strata_coordinator::CoordinatorConfig {
    strata_coordinator::CoordinatorConfig {
        model: default_model(),
        workers: workers.iter().map(|w| w.address.clone()).collect(),
        expected_devices: Vec::new(),
        split: strata_coordinator::plan::SplitSpec::Even,
        warmup: false,
        scheduler: Default::default(),
        requests: Default::default(),
        max_message_bytes: 64 << 20,
        security: strata_transport::Security::none(),
        clients: strata_coordinator::ClientAccess::open(),
        spares: Vec::new(),
        stage_timeout: std::time::Duration::from_secs(60),
        transfer_progress: None,
    }
}

/// Starts a coordinator with `config`, serves its gRPC API on a loopback port, and connects to it.
pub async fn serve_coordinator(
    config: strata_coordinator::CoordinatorConfig,
) -> strata_client::StrataClient {
    let coordinator = strata_coordinator::Coordinator::start(config)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(coordinator.serve(listener, std::future::pending()));
    strata_client::StrataClient::connect(&url).await.unwrap()
}
