//! A worker refuses malformed Forward calls with a clear status, loses nothing, and keeps serving;
//! calls with a stale epoch or a guessed sequence id change nothing and say nothing of others.

mod common;

use strata_harness::local::WorkerProcess;
use strata_harness::LocalOptions;
use strata_proto::v1;
use strata_proto::v1::worker_client::WorkerClient;
use tonic::Code;

const HIDDEN: usize = 576;

fn hidden(rows: usize, width: usize) -> v1::Tensor {
    v1::Tensor {
        data: vec![0u8; rows * width * 4],
        dtype: v1::DType::DtypeF32 as i32,
        shape: vec![rows as u32, width as u32],
    }
}

fn seq(seq_id: u64, start_pos: u32, input: v1::sequence_input::Input) -> v1::SequenceInput {
    v1::SequenceInput {
        seq_id,
        start_pos,
        input: Some(input),
        sampling: Some(v1::SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            ..Default::default()
        }),
        top_logprobs: 0,
        request_id: String::new(),
        seen: Vec::new(),
        allowed_tokens: Vec::new(),
        copy_prefix_from: 0,
    }
}

/// `seq` with its sampling changed by `change`, and `seen` tokens.
fn seq_sampling(
    seq_id: u64,
    change: impl FnOnce(&mut v1::SamplingParams),
    seen: Vec<v1::TokenCount>,
) -> v1::SequenceInput {
    let mut s = seq(
        seq_id,
        0,
        v1::sequence_input::Input::Hidden(hidden(1, HIDDEN)),
    );
    change(s.sampling.as_mut().unwrap());
    s.seen = seen;
    s
}

fn forward(epoch: u64, sequences: Vec<v1::SequenceInput>) -> v1::ForwardRequest {
    v1::ForwardRequest {
        step_id: 1,
        sequences,
        epoch,
    }
}

/// A fresh worker process (extra flags appended) and a raw gRPC client to it.
async fn spawn_worker(args: &[&str]) -> (WorkerProcess, WorkerClient<tonic::transport::Channel>) {
    common::raw_worker(&LocalOptions {
        worker_args: args.iter().map(|a| a.to_string()).collect(),
        ..LocalOptions::new(common::strata(), 1, common::default_model())
    })
    .await
}

async fn fingerprint(client: &mut WorkerClient<tonic::transport::Channel>) -> String {
    client
        .info(v1::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap()
        .fingerprint
}

fn load(model_fingerprint: &str, start: u32, end: u32) -> v1::LoadStageRequest {
    v1::LoadStageRequest {
        model_fingerprint: model_fingerprint.into(),
        layers: Some(v1::LayerRange { start, end }),
        output_dtype: 0,
        weights: None,
    }
}

/// Loads layers 15..30 and returns the load's epoch.
async fn loaded_epoch(
    client: &mut WorkerClient<tonic::transport::Channel>,
    fingerprint: &str,
) -> u64 {
    let epoch = client
        .load_stage(load(fingerprint, 15, 30))
        .await
        .unwrap()
        .into_inner()
        .epoch;
    assert_ne!(epoch, 0);
    epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_and_guessed_ids_change_nothing() {
    let (worker, mut client) = spawn_worker(&[]).await;
    use v1::sequence_input::Input;
    let fingerprint = fingerprint(&mut client).await;
    let first = loaded_epoch(&mut client, &fingerprint).await;
    let epoch = loaded_epoch(&mut client, &fingerprint).await;
    assert_ne!(first, epoch, "every load has its own epoch");
    let info = client.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.epoch, epoch);
    // A sequence of the current load, with 3 positions: nothing below may touch it.
    client
        .forward(forward(
            epoch,
            vec![seq(7, 0, Input::Hidden(hidden(3, HIDDEN)))],
        ))
        .await
        .unwrap();
    let unchanged = |info: v1::WorkerInfo| (info.active_sequences, info.cached_positions);

    for stale in [0, first, epoch ^ 1] {
        for s in [
            seq(7, 3, Input::Hidden(hidden(1, HIDDEN))),
            seq(8, 0, Input::Hidden(hidden(1, HIDDEN))),
        ] {
            let err = client.forward(forward(stale, vec![s])).await.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            assert!(
                err.message().contains("not the loaded one"),
                "{}",
                err.message()
            );
            assert!(
                !err.message().contains(&epoch.to_string()),
                "the current epoch leaked"
            );
        }
        let err = client
            .release(v1::ReleaseRequest {
                seq_ids: vec![7],
                epoch: stale,
                park: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let info = client.info(v1::InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(
            unchanged(info),
            (1, 3),
            "a stale call with epoch {stale} changed the stage"
        );
    }

    // Guessed ids with the right epoch: a continuation is refused without saying what is cached,
    // a start makes a sequence of the guesser's own, a release frees nothing.
    for guess in [1u64, 8, u64::MAX, 0x5eed] {
        let err = client
            .forward(forward(
                epoch,
                vec![seq(guess, 3, Input::Hidden(hidden(1, HIDDEN)))],
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        let released = client
            .release(v1::ReleaseRequest {
                seq_ids: vec![guess],
                epoch,
                park: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(released.released, 0);
    }
    // Rewriting the real sequence's positions is refused, and the error does not say its length.
    let err = client
        .forward(forward(
            epoch,
            vec![seq(7, 1, Input::Hidden(hidden(1, HIDDEN)))],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!err.message().contains('3'), "{}", err.message());
    let info = client.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(unchanged(info), (1, 3));

    // The rightful caller carries on.
    client
        .forward(forward(
            epoch,
            vec![seq(7, 3, Input::Hidden(hidden(1, HIDDEN)))],
        ))
        .await
        .unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_forwards_get_clear_errors_and_the_worker_keeps_serving() {
    let (worker, mut client) = spawn_worker(&[]).await;
    use v1::sequence_input::Input;

    // Before LoadStage there is nothing to run.
    let epoch = 0;
    let err = client
        .forward(forward(
            epoch,
            vec![seq(1, 0, Input::Hidden(hidden(1, HIDDEN)))],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("LoadStage"), "{}", err.message());

    let fingerprint = fingerprint(&mut client).await;
    let err = client
        .load_stage(load("not-this-model", 15, 30))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("model mismatch"),
        "{}",
        err.message()
    );
    let err = client
        .load_stage(load(&fingerprint, 20, 31))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client.load_stage(load("", 15, 30)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("fingerprint"), "{}", err.message());
    let epoch = loaded_epoch(&mut client, &fingerprint).await;

    // A sequence with 3 cached positions, to check that rejected calls leave it alone.
    client
        .forward(forward(
            epoch,
            vec![seq(7, 0, Input::Hidden(hidden(3, HIDDEN)))],
        ))
        .await
        .unwrap();

    let mut bad_dtype = hidden(1, HIDDEN);
    bad_dtype.dtype = 99;
    let mut short = hidden(1, HIDDEN);
    short.data.pop();
    let cases: Vec<(&str, Vec<v1::SequenceInput>, Code, &str)> = vec![
        (
            "wrong shape",
            vec![seq(1, 0, Input::Hidden(hidden(1, 100)))],
            Code::InvalidArgument,
            "expected [n_tokens, 576]",
        ),
        (
            "unknown dtype",
            vec![seq(1, 0, Input::Hidden(bad_dtype))],
            Code::InvalidArgument,
            "unknown tensor dtype 99",
        ),
        (
            "bytes do not match the shape",
            vec![seq(1, 0, Input::Hidden(short))],
            Code::InvalidArgument,
            "needs 2304 bytes",
        ),
        (
            "unknown sequence",
            vec![seq(42, 5, Input::Hidden(hidden(1, HIDDEN)))],
            Code::NotFound,
            "sequence 42 is not cached",
        ),
        (
            "skipped position",
            vec![seq(7, 5, Input::Hidden(hidden(1, HIDDEN)))],
            Code::InvalidArgument,
            "is not where its cache ends",
        ),
        (
            "rewritten position",
            vec![seq(7, 0, Input::Hidden(hidden(1, HIDDEN)))],
            Code::InvalidArgument,
            "is not where its cache ends",
        ),
        (
            "tokens to a later stage",
            vec![seq(1, 0, Input::Tokens(v1::TokenIds { ids: vec![1, 2] }))],
            Code::InvalidArgument,
            "takes hidden states",
        ),
        (
            "unknown sequence far ahead",
            vec![seq(1, 8190, Input::Hidden(hidden(1, HIDDEN)))],
            Code::NotFound,
            "not cached",
        ),
        (
            "a copy from a sequence this worker does not hold",
            vec![v1::SequenceInput {
                copy_prefix_from: 12345,
                ..seq(1, 2, Input::Hidden(hidden(1, HIDDEN)))
            }],
            Code::Aborted,
            "prefix source 12345 is not held",
        ),
        (
            "a copy of more positions than the source holds",
            vec![v1::SequenceInput {
                copy_prefix_from: 7,
                ..seq(1, 4, Input::Hidden(hidden(1, HIDDEN)))
            }],
            Code::InvalidArgument,
            "holds fewer than the 4 positions",
        ),
        (
            "a copy of a sequence into itself",
            vec![v1::SequenceInput {
                copy_prefix_from: 7,
                ..seq(7, 3, Input::Hidden(hidden(1, HIDDEN)))
            }],
            Code::InvalidArgument,
            "names the sequence itself",
        ),
        (
            "duplicate ids",
            vec![
                seq(7, 3, Input::Hidden(hidden(1, HIDDEN))),
                seq(7, 3, Input::Hidden(hidden(1, HIDDEN))),
            ],
            Code::InvalidArgument,
            "appears twice",
        ),
        (
            "no input",
            vec![v1::SequenceInput {
                seq_id: 1,
                start_pos: 0,
                input: None,
                sampling: None,
                top_logprobs: 0,
                request_id: String::new(),
                seen: Vec::new(),
                allowed_tokens: Vec::new(),
                copy_prefix_from: 0,
            }],
            Code::InvalidArgument,
            "neither token ids nor hidden states",
        ),
        ("empty batch", vec![], Code::InvalidArgument, "no sequences"),
        (
            "a penalty out of range",
            vec![seq_sampling(1, |p| p.presence_penalty = 5.0, Vec::new())],
            Code::InvalidArgument,
            "presence_penalty 5 must be in [-2, 2]",
        ),
        (
            "a bias for a token outside the vocabulary",
            vec![seq_sampling(
                1,
                |p| {
                    p.logit_bias = vec![v1::TokenBias {
                        id: 49152,
                        bias: 1.0,
                    }]
                },
                Vec::new(),
            )],
            Code::InvalidArgument,
            "token 49152 is outside the vocabulary of 49152",
        ),
        (
            "a seen token outside the vocabulary",
            vec![seq_sampling(
                1,
                |p| p.repetition_penalty = 1.2,
                vec![v1::TokenCount {
                    id: u32::MAX,
                    generated: 1,
                }],
            )],
            Code::InvalidArgument,
            "is outside the vocabulary",
        ),
        (
            "a grammar mask of the wrong size",
            vec![v1::SequenceInput {
                allowed_tokens: vec![u32::MAX; 10],
                ..seq_sampling(1, |_| {}, Vec::new())
            }],
            Code::InvalidArgument,
            "a mask of 10 words for a vocabulary of 49152 (wants 1536)",
        ),
        (
            "a grammar mask that allows nothing",
            vec![v1::SequenceInput {
                allowed_tokens: vec![0; 1536],
                ..seq_sampling(1, |_| {}, Vec::new())
            }],
            Code::InvalidArgument,
            "the mask allows no token",
        ),
        // A valid sequence in the same batch as a bad one: the whole call is refused, nothing runs.
        (
            "one bad in a batch",
            vec![
                seq(7, 3, Input::Hidden(hidden(1, HIDDEN))),
                seq(8, 0, Input::Hidden(hidden(2, 7))),
            ],
            Code::InvalidArgument,
            "sequence 8",
        ),
    ];
    for (what, sequences, code, message) in cases {
        let err = client
            .forward(forward(epoch, sequences))
            .await
            .expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(message),
            "{what}: {:?} lacks {message:?}",
            err.message()
        );
    }
    let long = client
        .forward(forward(
            epoch,
            vec![seq(9, 0, Input::Hidden(hidden(8193, HIDDEN)))],
        ))
        .await
        .unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument);
    assert!(
        long.message().contains("context length 8192"),
        "{}",
        long.message()
    );

    // Nothing was lost: sequence 7 continues at position 3 and the last stage samples a token.
    let ok = client
        .forward(forward(
            epoch,
            vec![seq(7, 3, Input::Hidden(hidden(1, HIDDEN)))],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.outputs.len(), 1);
    assert!(matches!(
        ok.outputs[0].output,
        Some(v1::sequence_output::Output::Sampled(_))
    ));
    let info = client.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.active_sequences, info.cached_positions), (1, 4));

    // Warmup while a sequence is in flight leaves it alone and adds nothing.
    client
        .warmup(v1::WarmupRequest { tokens: 8 })
        .await
        .unwrap();
    let info = client.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.active_sequences, info.cached_positions), (1, 4));
    let ok = client
        .forward(forward(
            epoch,
            vec![seq(7, 4, Input::Hidden(hidden(1, HIDDEN)))],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.outputs.len(), 1);

    // Release is idempotent and frees the cache.
    let released = client
        .release(v1::ReleaseRequest {
            seq_ids: vec![7, 7, 1000],
            epoch,
            park: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.released, 1);
    assert_eq!(
        client
            .info(v1::InfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .active_sequences,
        0
    );

    // Warmup leaves nothing behind.
    client
        .warmup(v1::WarmupRequest { tokens: 8 })
        .await
        .unwrap();
    let info = client.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.active_sequences, info.cached_positions), (0, 0));
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_memory_past_the_bound_is_refused_not_a_crash() {
    let (worker, mut client) = spawn_worker(&["--max-cache-mib", "1"]).await;
    let fingerprint = fingerprint(&mut client).await;
    let epoch = loaded_epoch(&mut client, &fingerprint).await;
    use v1::sequence_input::Input;
    // 15 layers × 3 kv heads × 64 × 4 bytes × 2 (k, v) = 23 KiB per position: 64 positions could
    // need ~3 MiB, over the 1 MiB bound.
    let err = client
        .forward(forward(
            epoch,
            vec![seq(1, 0, Input::Hidden(hidden(64, HIDDEN)))],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("KV caches would grow past"),
        "{}",
        err.message()
    );
    client
        .forward(forward(
            epoch,
            vec![seq(1, 0, Input::Hidden(hidden(8, HIDDEN)))],
        ))
        .await
        .unwrap();
    let info = client.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.active_sequences, info.cached_positions), (1, 8));
    worker.stop().await.unwrap();
}

/// Regression (found by the soak): `Health` and `Info` used to queue behind compute, so a long
/// prefill made a busy worker look dead to the coordinator's health checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_info_answer_while_a_long_forward_computes() {
    use std::time::{Duration, Instant};
    use v1::sequence_input::Input;
    let (worker, mut client) = spawn_worker(&["--threads", "1"]).await;
    let fingerprint = fingerprint(&mut client).await;
    let epoch = client
        .load_stage(load(&fingerprint, 0, 30))
        .await
        .unwrap()
        .into_inner()
        .epoch;
    let ids: Vec<u32> = (0..500).map(|i| 100 + (i % 1000)).collect();
    let mut busy = client.clone();
    let long = tokio::spawn(async move {
        let started = Instant::now();
        busy.forward(forward(
            epoch,
            vec![seq(1, 0, Input::Tokens(v1::TokenIds { ids }))],
        ))
        .await
        .unwrap();
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let health = client
        .health(v1::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    client.info(v1::InfoRequest {}).await.unwrap();
    let answered = started.elapsed();
    let forward_took = long.await.unwrap();
    assert_eq!(health.status, v1::health_response::Status::Serving as i32);
    assert!(
        forward_took > Duration::from_millis(800),
        "the forward was too short to test anything: {forward_took:?}"
    );
    assert!(
        answered < Duration::from_millis(250),
        "Health+Info took {answered:?} while a {forward_took:?} forward ran"
    );
    worker.stop().await.unwrap();
}
