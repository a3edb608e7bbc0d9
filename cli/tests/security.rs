//! TLS and token auth on real processes: calls without the token, with a wrong one, or in plaintext
//! to a TLS port are refused; the secure cluster generates what the plain one does.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use strata_client::GenerateParams;
use strata_harness::local::WorkerProcess;
use strata_harness::{LocalCluster, LocalOptions};
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
        status
            .message()
            .contains("requires the cluster's auth token"),
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

    // The coordinator's port wants a client API key, and the cluster's token is not one.
    let no_token = without_token(&files);
    let client = strata_client::StrataClient::connect_with(secure.url(), &no_token)
        .await
        .unwrap();
    let err = client.generate_collect(prompt, &params).await.unwrap_err();
    assert!(err.to_string().contains("requires an API key"), "{err}");
    let member = strata_client::StrataClient::connect_with(secure.url(), secure.security())
        .await
        .unwrap();
    let err = member.generate_collect(prompt, &params).await.unwrap_err();
    assert!(err.to_string().contains("unknown API key"), "{err}");

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

/// The role rules on real processes: a worker admits cluster members only (the node CA's
/// certificates and the cluster's token), so a client's key, a client's certificate, or both with
/// the token are refused; a client certificate cannot serve as a worker either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_ports_admit_only_cluster_members() {
    let dir = tempfile::tempdir().unwrap();
    let node = keys(dir.path());
    let client_dir = dir.path().join("client");
    let client = SecurityFiles::from_keys_dir(&client_dir);
    let options = LocalOptions {
        security: node.clone(),
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    };
    let worker = WorkerProcess::spawn(&options).await.unwrap();
    let address = worker.address.clone();
    let member = Security::load(&node).unwrap();
    assert!(info(&member, &address).await.is_ok());

    // The node's certificate, but a client's API key as the credential: refused by the token check.
    let api_key = std::fs::read_to_string(client_dir.join("api-key")).unwrap();
    let with_key = Security::load(&SecurityFiles {
        token_file: None,
        token: Some(api_key.trim().into()),
        ..node.clone()
    })
    .unwrap();
    let status = info(&with_key, &address).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), "wrong auth token");

    // A client's certificate (client CA), even with the cluster's token: the handshake fails.
    let stolen_token = Security::load(&SecurityFiles {
        token_file: node.token_file.clone(),
        ..client.clone()
    })
    .unwrap();
    assert!(info(&stolen_token, &address).await.is_err());
    // No certificate at all: the worker requires one once it has a CA.
    let no_cert = Security::load(&SecurityFiles {
        cert: None,
        key: None,
        ..node.clone()
    })
    .unwrap();
    assert!(info(&no_cert, &address).await.is_err());
    assert!(info(&member, &address).await.is_ok());
    worker.stop().await.unwrap();

    // A worker presenting a client certificate is no worker to a coordinator: the client
    // certificate is for client auth only, and its CA is not the node CA.
    let impostor = WorkerProcess::spawn(&LocalOptions {
        security: SecurityFiles {
            cert: client.cert.clone(),
            key: client.key.clone(),
            ..node.clone()
        },
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    })
    .await
    .unwrap();
    let refused = info(&member, &impostor.address).await.unwrap_err();
    assert!(
        refused.message().contains("certificate") || refused.message().contains("cannot connect"),
        "{refused:?}"
    );
    let _ = impostor.stop().await;
}

/// Client keys come from a file with names: each request is counted under its key's name, a
/// key removed from the file stops working within seconds without a restart, and the other keys
/// keep working; `/metrics` wants its scrape token, not a client key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_named_counted_and_revocable_by_editing_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("api-keys");
    let (alice_line, alice) = strata_transport::new_key_line("alice").unwrap();
    let (bob_line, bob) = strata_transport::new_key_line("bob").unwrap();
    std::fs::write(&keys_file, format!("# clients\n{alice_line}{bob_line}")).unwrap();
    let scrape = AuthToken::generate().unwrap();
    let scrape_file = dir.path().join("scrape");
    std::fs::write(&scrape_file, scrape.as_str()).unwrap();
    let cluster = LocalCluster::start(LocalOptions {
        api_keys: Some(keys_file.clone()),
        metrics_token: Some(scrape_file),
        http: Some("127.0.0.1:0".into()),
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    })
    .await
    .unwrap();
    assert!(cluster.api_key().is_none());
    let http = cluster.http_url().unwrap().to_string();
    let complete = |key: &AuthToken| {
        let http = http.clone();
        let key = key.as_str().to_string();
        async move {
            common::http_post(
                &format!("{http}/v1/completions"),
                &key,
                r#"{"model":"SmolLM2-135M-Instruct.Q4_1","prompt":"Hello","max_tokens":2}"#,
            )
            .await
        }
    };
    let grpc = |key: &AuthToken| {
        let security = cluster.security().with_credential(Some(key.clone()));
        let url = cluster.url().to_string();
        async move {
            let client = strata_client::StrataClient::connect_with(&url, &security).await?;
            client
                .generate_collect(
                    "Hello",
                    &GenerateParams {
                        max_tokens: 2,
                        ..GenerateParams::default()
                    },
                )
                .await
        }
    };
    assert_eq!(complete(&alice).await.0, 200);
    assert_eq!(complete(&bob).await.0, 200);
    grpc(&alice).await.unwrap();

    let (status, body) = common::http_get(&format!("{http}/metrics"), scrape.as_str()).await;
    assert_eq!(status, 200, "{body}");
    for line in [
        r#"strata_requests_total{api="openai",key="alice",outcome="length"} 1"#,
        r#"strata_requests_total{api="openai",key="bob",outcome="length"} 1"#,
        r#"strata_requests_total{api="grpc",key="alice",outcome="length"} 1"#,
    ] {
        assert!(body.contains(line), "missing {line} in\n{body}");
    }
    assert_eq!(
        common::http_get(&format!("{http}/metrics"), alice.as_str())
            .await
            .0,
        401
    );

    // Revoke alice by editing the file; the coordinator rereads it.
    std::fs::write(&keys_file, &bob_line).unwrap();
    let revoked = Instant::now();
    loop {
        let (status, body) = complete(&alice).await;
        if status == 401 {
            assert!(body.contains("unknown API key"), "{body}");
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "alice's key still works"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "a revoked key was refused {:?} after the file changed",
        revoked.elapsed()
    );
    let err = grpc(&alice).await.unwrap_err();
    assert!(err.to_string().contains("unknown API key"), "{err}");
    assert_eq!(complete(&bob).await.0, 200);
    // Keys fail closed: a file whose only line does not parse leaves no key valid (it never keeps
    // the keys it held before).
    std::fs::write(&keys_file, "bob\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(complete(&bob).await.0, 401);
    cluster.stop().await.unwrap();
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
