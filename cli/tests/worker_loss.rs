//! Losing a worker mid-generation, with real processes: with a spare the stream completes with the
//! uninterrupted run's tokens; without one the client gets UNAVAILABLE naming the stage and worker
//! within 5 s, and the coordinator serves again once the worker is back at its address. A hung
//! worker (SIGSTOP) ends every stream, running or queued, within 5 s too.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use strata_client::{ClientError, Event, GenerateParams, StrataClient};
use strata_coordinator::CoordinatorConfig;
use strata_harness::local::WorkerProcess;
use strata_harness::LocalOptions;
use strata_proto::v1;

const PROMPT: &str = "Once upon a time, there was a little";

fn options() -> LocalOptions {
    LocalOptions {
        threads: Some(1),
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    }
}

fn params(seed: u64, temperature: f32) -> GenerateParams {
    GenerateParams {
        max_tokens: 64,
        temperature,
        seed,
        ignore_eos: true,
        ..GenerateParams::default()
    }
}

/// A coordinator in this process over `workers` (even split) with `spares`; returns its client.
async fn coordinator(workers: &[&WorkerProcess], spares: &[&WorkerProcess]) -> StrataClient {
    coordinator_with(workers, spares, Default::default()).await
}

async fn coordinator_with(
    workers: &[&WorkerProcess],
    spares: &[&WorkerProcess],
    scheduler: strata_coordinator::scheduler::SchedulerLimits,
) -> StrataClient {
    common::serve_coordinator(CoordinatorConfig {
        warmup: true,
        scheduler,
        spares: spares.iter().map(|w| w.address.clone()).collect(),
        stage_timeout: Duration::from_secs(30),
        ..common::coordinator_config(workers)
    })
    .await
}

/// Waits (up to 30 s) until the coordinator's `Health` says it serves again.
async fn wait_until_serving(client: &StrataClient) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = client.health().await.unwrap();
        if health.status == v1::health_response::Status::Serving as i32 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not serving again: {}",
            health.message
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Streams a generation, calling `at_token(n)` after the n-th token; returns the ids, or the error
/// and when it came.
async fn stream_until(
    client: &StrataClient,
    params: &GenerateParams,
    kill_after: usize,
    victim: &mut WorkerProcess,
) -> (Vec<u32>, Option<(ClientError, Duration)>) {
    stream_prompt_until(client, PROMPT, params, kill_after, victim).await
}

async fn stream_prompt_until(
    client: &StrataClient,
    prompt: &str,
    params: &GenerateParams,
    kill_after: usize,
    victim: &mut WorkerProcess,
) -> (Vec<u32>, Option<(ClientError, Duration)>) {
    let mut stream = client.generate(prompt, params).await.unwrap();
    let mut ids = Vec::new();
    let mut killed_at = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Token(t)) => {
                ids.push(t.id);
                if ids.len() == kill_after {
                    victim.kill().await;
                    killed_at = Some(Instant::now());
                }
            }
            Ok(Event::Finished(_)) => break,
            Err(e) => {
                let waited = killed_at.map_or(Duration::ZERO, |t| t.elapsed());
                return (ids, Some((e, waited)));
            }
        }
    }
    (ids, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_spare_the_stream_completes_with_the_same_tokens() {
    let first = WorkerProcess::spawn(&options()).await.unwrap();
    let mut second = WorkerProcess::spawn(&options()).await.unwrap();
    let spare = WorkerProcess::spawn(&options()).await.unwrap();
    let client = coordinator(&[&first, &second], &[&spare]).await;

    let greedy = params(0, 0.0);
    let expected = client
        .generate_collect(PROMPT, &greedy)
        .await
        .unwrap()
        .token_ids;
    assert_eq!(expected.len(), 64);
    let sampled = params(7, 0.8);
    let expected_sampled = client
        .generate_collect(PROMPT, &sampled)
        .await
        .unwrap()
        .token_ids;

    let started = Instant::now();
    let (got, error) = stream_until(&client, &greedy, 10, &mut second).await;
    assert!(error.is_none(), "the stream broke: {error:?}");
    assert_eq!(got, expected, "tokens after the replay differ");
    eprintln!(
        "stream with a loss and a spare holding the file done in {:?}",
        started.elapsed()
    );

    // The spare now holds the stage, and seeded sampling gives what it gave before the loss.
    let again = client.generate_collect(PROMPT, &sampled).await.unwrap();
    assert_eq!(again.token_ids, expected_sampled);
    let info = client.info().await.unwrap();
    assert_eq!(info.stages[1].worker, spare.address, "{info:?}");
    assert_eq!(info.active_sequences, 0);
    first.stop().await.unwrap();
    spare.stop().await.unwrap();
}

/// A spare without the model file, its cache empty, gets the lost stage's weights from the
/// coordinator when it takes over, and the stream goes on with the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_started_on_a_cached_prefix_survives_a_loss_with_the_same_tokens() {
    let first = WorkerProcess::spawn(&options()).await.unwrap();
    let mut second = WorkerProcess::spawn(&options()).await.unwrap();
    let spare = WorkerProcess::spawn(&options()).await.unwrap();
    let client = coordinator(&[&first, &second], &[&spare]).await;
    let prompt = format!(
        "{PROMPT} girl who lived in a house at the edge of a forest with her \
        grandmother, two cats and a garden full of vegetables. One morning"
    );
    let greedy = GenerateParams {
        top_logprobs: 2,
        ..params(0, 0.0)
    };
    let expected = client.generate_collect(&prompt, &greedy).await.unwrap();
    assert_eq!(expected.cached_tokens, 0);

    // The same prompt again starts on the first run's parked caches; after the loss it is replayed
    // on the spare under a fresh id, computing everything, and the stream goes on. (A run that
    // starts on a copy rounds a little differently from a cold one: tokens may part at near-ties.)
    let (got, error) = stream_prompt_until(&client, &prompt, &greedy, 10, &mut second).await;
    assert!(error.is_none(), "the stream failed: {error:?}");
    common::assert_same_or_near_tie("the replayed stream", &got, &expected);
    wait_until_serving(&client).await;
    // The replayed sequence's caches (on the spare now) serve the next request.
    let again = client.generate_collect(&prompt, &greedy).await.unwrap();
    assert!(again.cached_tokens > 0, "the cache serves again");
    common::assert_same_or_near_tie("a run on the spare's cache", &again.token_ids, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_without_the_model_file_is_sent_the_stage_and_the_stream_completes() {
    let cache = tempfile::tempdir().unwrap();
    let first = WorkerProcess::spawn(&options()).await.unwrap();
    let mut second = WorkerProcess::spawn(&options()).await.unwrap();
    let spare = WorkerProcess::spawn(&LocalOptions {
        weight_cache: Some(cache.path().to_owned()),
        ..options()
    })
    .await
    .unwrap();
    let client = coordinator(&[&first, &second], &[&spare]).await;
    let greedy = params(0, 0.0);
    let expected = client
        .generate_collect(PROMPT, &greedy)
        .await
        .unwrap()
        .token_ids;
    let started = Instant::now();
    let (got, error) = stream_until(&client, &greedy, 10, &mut second).await;
    assert!(error.is_none(), "the stream broke: {error:?}");
    assert_eq!(got, expected, "tokens after the replay differ");
    eprintln!(
        "stream with a loss and a bare spare done in {:?}",
        started.elapsed()
    );
    let info = client.info().await.unwrap();
    assert_eq!(info.stages[1].worker, spare.address, "{info:?}");
    first.stop().await.unwrap();
    spare.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_spare_the_client_hears_at_once_and_service_resumes() {
    let first = WorkerProcess::spawn(&options()).await.unwrap();
    let mut second = WorkerProcess::spawn(&options()).await.unwrap();
    let address = second.address.clone();
    let client = coordinator(&[&first, &second], &[]).await;

    let params = params(0, 0.0);
    let expected = client
        .generate_collect(PROMPT, &params)
        .await
        .unwrap()
        .token_ids;
    let (got, error) = stream_until(&client, &params, 10, &mut second).await;
    let (error, waited) = error.expect("the stream should fail when its worker dies");
    assert!(
        waited < Duration::from_secs(5),
        "UNAVAILABLE took {waited:?}"
    );
    let ClientError::Status(status) = &error else {
        panic!("not a status: {error}");
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("stage 1") && status.message().contains(&address),
        "{status:?}"
    );
    assert_eq!(got[..], expected[..got.len()]);

    // While the stage is down, requests are refused at once with the same explanation.
    let refused = client.generate_collect(PROMPT, &params).await.unwrap_err();
    assert!(refused.to_string().contains(&address), "{refused}");

    // The worker comes back at the same address; the coordinator reloads its stage by itself.
    let restarted = WorkerProcess::spawn_at(&options(), &address).await.unwrap();
    wait_until_serving(&client).await;
    let after = client
        .generate_collect(PROMPT, &params)
        .await
        .unwrap()
        .token_ids;
    assert_eq!(after, expected);
    first.stop().await.unwrap();
    restarted.stop().await.unwrap();
}

fn signal(worker: &WorkerProcess, signal: &str) {
    let pid = worker.pid().expect("the worker runs");
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Issue #20's probes: a SIGSTOPped worker held 8 streams for 120 s, and after a loss the queued
/// requests waited 600 s for their deadline. Now every stream, running or queued, has its answer
/// within 5 s, and the service is back after SIGCONT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_ends_every_stream_and_the_queue_within_5_s() {
    let first = WorkerProcess::spawn(&options()).await.unwrap();
    let second = WorkerProcess::spawn(&options()).await.unwrap();
    let limits = strata_coordinator::scheduler::SchedulerLimits {
        max_active: 2,
        ..Default::default()
    };
    let client = coordinator_with(&[&first, &second], &[], limits).await;
    let long = GenerateParams {
        max_tokens: 2000,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let mut streams = Vec::new();
    for i in 0..6 {
        streams.push(
            client
                .generate(&format!("{PROMPT} {i}"), &long)
                .await
                .unwrap(),
        );
    }
    // Two run (the rest queue): wait until the first has tokens out.
    let mut seen = 0;
    while seen < 5 {
        if let Some(Ok(Event::Token(_))) = streams[0].next().await {
            seen += 1;
        }
    }
    signal(&second, "-STOP");
    let stopped = Instant::now();
    let ends = streams.into_iter().map(|mut stream| async move {
        loop {
            match stream.next().await {
                Some(Ok(Event::Token(_))) => {}
                Some(Ok(Event::Finished(f))) => panic!("finished while its worker hung: {f:?}"),
                Some(Err(e)) => return (e, stopped.elapsed()),
                None => panic!("the stream ended without an answer"),
            }
        }
    });
    let ends = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(ends))
        .await
        .expect("streams still open 30 s after the worker hung");
    signal(&second, "-CONT");
    for (i, (error, waited)) in ends.iter().enumerate() {
        eprintln!("stream {i}: {waited:?}: {error}");
        let ClientError::Status(status) = error else {
            panic!("stream {i}: not a status: {error}");
        };
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "stream {i}: {status:?}"
        );
        assert!(
            status.message().contains("stage 1"),
            "stream {i}: {status:?}"
        );
        assert!(
            *waited < Duration::from_secs(5),
            "stream {i} waited {waited:?}"
        );
    }
    // Awake again, the worker takes its stage back and the service resumes.
    wait_until_serving(&client).await;
    let after = client
        .generate_collect(PROMPT, &params(0, 0.0))
        .await
        .unwrap();
    assert_eq!(after.token_ids.len(), 64);
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

/// Waits (up to 30 s) until the cluster answers again, and checks it answers `expected`.
async fn serves_the_same_again(client: &StrataClient, greedy: &GenerateParams, expected: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.generate_collect(PROMPT, greedy).await {
            Ok(again) => {
                assert_eq!(again.token_ids, expected);
                return;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "not serving again: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A stage loaded over by someone else (another layer range on the same worker, or the same range:
/// a new epoch) is noticed by the health checks and loaded back: requests are right again within
/// seconds, not failing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_loaded_over_by_someone_else_is_noticed_and_put_back() {
    let first = WorkerProcess::spawn(&options()).await.unwrap();
    let second = WorkerProcess::spawn(&options()).await.unwrap();
    let client = coordinator(&[&first, &second], &[]).await;
    let greedy = params(0, 0.0);
    let expected = client
        .generate_collect(PROMPT, &greedy)
        .await
        .unwrap()
        .token_ids;

    let mut raw = v1::worker_client::WorkerClient::connect(format!("http://{}", second.address))
        .await
        .unwrap();
    let info = raw.info(v1::InfoRequest {}).await.unwrap().into_inner();
    let planned = info.loaded.expect("a stage");
    let fingerprint = info.model.expect("a model").fingerprint;
    let planned_fingerprint = fingerprint.clone();
    raw.load_stage(v1::LoadStageRequest {
        model_fingerprint: fingerprint,
        layers: Some(v1::LayerRange { start: 0, end: 3 }),
        output_dtype: 0,
        weights: None,
    })
    .await
    .unwrap();
    let swapped = Instant::now();
    loop {
        let info = raw.info(v1::InfoRequest {}).await.unwrap().into_inner();
        if info.loaded == Some(planned) {
            break;
        }
        assert!(
            swapped.elapsed() < Duration::from_secs(10),
            "the coordinator did not put its stage back: {:?}",
            info.loaded
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "stage put back {:?} after it was loaded over",
        swapped.elapsed()
    );
    serves_the_same_again(&client, &greedy, &expected).await;

    // Loaded over with the very layers planned: only the epoch tells, and it is enough.
    let ours = raw
        .load_stage(v1::LoadStageRequest {
            model_fingerprint: planned_fingerprint,
            layers: Some(planned),
            output_dtype: 0,
            weights: None,
        })
        .await
        .unwrap()
        .into_inner()
        .epoch;
    let swapped = Instant::now();
    loop {
        let info = raw.info(v1::InfoRequest {}).await.unwrap().into_inner();
        if info.epoch != ours {
            break;
        }
        assert!(
            swapped.elapsed() < Duration::from_secs(10),
            "the coordinator did not notice its stage was loaded again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "stage loaded again {:?} after it was loaded over with the same layers",
        swapped.elapsed()
    );
    serves_the_same_again(&client, &greedy, &expected).await;
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}
