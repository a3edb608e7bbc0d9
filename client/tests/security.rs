//! TLS and token auth on real processes: calls without the token, with a wrong one, or in plaintext
//! to a TLS port are refused; the secure cluster generates what the plain one does.

mod common;

use std::path::Path;
use std::time::Duration;

use strata_client::local::WorkerProcess;
use strata_client::{GenerateParams, LocalCluster, LocalOptions};
use strata_proto::v1;
use strata_proto::v1::worker_client::WorkerClient;
use strata_transport::{AuthToken, Security, SecurityFiles};
use tonic::Code;

fn keys(dir: &Path) -> SecurityFiles {
    let out = common::run(&["keys", "--out", dir.to_str().unwrap(), "--host", "node-a"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("token") && text.contains("node-a"), "{text}");
    SecurityFiles::from_keys_dir(dir)
}

/// The same TLS setup without the token.
fn without_token(files: &SecurityFiles) -> Security {
    Security::load(&SecurityFiles {
        token_file: None,
        ..files.clone()
    })
    .unwrap()
}

async fn token_ids(cluster: &LocalCluster, prompt: &str, params: &GenerateParams) -> Vec<u32> {
    let client = cluster.client().await.unwrap();
    client
        .generate_collect(prompt, params)
        .await
        .unwrap()
        .token_ids
}

async fn info(security: &Security, address: &str) -> Result<v1::WorkerInfo, tonic::Status> {
    let channel = security
        .connect(address, Duration::from_secs(5))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    WorkerClient::new(channel)
        .info(v1::InfoRequest {})
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_worker_admits_only_tls_calls_with_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let files = keys(dir.path());
    let options = LocalOptions {
        security: files.clone(),
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    };
    let worker = WorkerProcess::spawn(&options).await.unwrap();
    let address = worker.address.clone();

    let good = Security::load(&files).unwrap();
    assert!(info(&good, &address).await.is_ok());

    let no_token = without_token(&files);
    let status = info(&no_token, &address).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("requires an auth token"),
        "{status:?}"
    );

    let wrong = Security::load(&SecurityFiles {
        token_file: None,
        token: Some(AuthToken::generate().unwrap().as_str().into()),
        ..files.clone()
    })
    .unwrap();
    let status = info(&wrong, &address).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), "wrong auth token");

    // Plaintext HTTP/2 to the TLS port, even with the right token, never reaches the service.
    let plaintext = Security::load(&SecurityFiles {
        token_file: files.token_file.clone(),
        ..SecurityFiles::default()
    })
    .unwrap();
    let refused = info(&plaintext, &address).await;
    assert!(refused.is_err(), "plaintext call answered: {refused:?}");
    assert_ne!(refused.unwrap_err().code(), Code::Ok);

    // TLS that does not trust the cluster's CA fails the handshake.
    let other = tempfile::tempdir().unwrap();
    let stranger = Security::load(&keys(other.path())).unwrap();
    assert!(info(&stranger, &address).await.is_err());

    // The worker is still fine after all that.
    assert!(info(&good, &address).await.is_ok());
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_with_a_token_generates_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let files = SecurityFiles {
        mutual_tls: true,
        ..keys(dir.path())
    };
    let params = GenerateParams {
        max_tokens: 12,
        ..GenerateParams::default()
    };
    let prompt = "The capital of France is";
    let plain = LocalCluster::start(LocalOptions::new(
        common::strata(),
        2,
        common::default_model(),
    ))
    .await
    .unwrap();
    let expected = token_ids(&plain, prompt, &params).await;
    plain.stop().await.unwrap();

    let secure = LocalCluster::start(LocalOptions {
        security: files.clone(),
        ..LocalOptions::new(common::strata(), 2, common::default_model())
    })
    .await
    .unwrap();
    assert!(secure.url().starts_with("https://"), "{}", secure.url());
    assert_eq!(token_ids(&secure, prompt, &params).await, expected);

    // The coordinator's port wants the token too.
    let no_token = without_token(&files);
    let client = strata_client::StrataClient::connect_with(secure.url(), &no_token)
        .await
        .unwrap();
    let err = client.generate_collect(prompt, &params).await.unwrap_err();
    assert!(err.to_string().contains("auth token"), "{err}");

    // Plaintext to the TLS port is refused (how h2 reports it varies: a frame-size error, which the
    // client turns into a hint about TLS, or a cancelled call).
    let plain_url = secure.url().replace("https://", "http://");
    let plaintext = Security::load(&SecurityFiles {
        token_file: files.token_file.clone(),
        ..SecurityFiles::default()
    })
    .unwrap();
    let refused = match strata_client::StrataClient::connect_with(&plain_url, &plaintext).await {
        Ok(c) => c.generate_collect(prompt, &params).await.is_err(),
        Err(_) => true,
    };
    assert!(
        refused,
        "a plaintext client got an answer from the TLS port"
    );

    // Mutual TLS: a client without a certificate is refused at the handshake.
    let no_cert = Security::load(&SecurityFiles {
        cert: None,
        key: None,
        mutual_tls: false,
        ..files.clone()
    })
    .unwrap();
    let refused = match strata_client::StrataClient::connect_with(secure.url(), &no_cert).await {
        Ok(c) => c.generate_collect(prompt, &params).await.is_err(),
        Err(_) => true,
    };
    assert!(
        refused,
        "a client without a certificate got through mutual TLS"
    );
    secure.stop().await.unwrap();
}

#[test]
fn listening_beyond_loopback_without_security_needs_insecure() {
    let output = std::process::Command::new(common::strata())
        .args(["worker", "--listen", "0.0.0.0:0", "--model"])
        .arg(common::default_model())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--insecure") && stderr.contains("strata keys"),
        "{stderr}"
    );
}
