//! Fuzzing the worker's Forward path: structured random and mutated `ForwardRequest`s (arbitrary
//! sequence ids, positions, token ids, tensor bytes/shape/dtype, sampling numbers) and `Release`s go
//! through the real service and engine of two stages of a tiny model. A panic, a crash or an
//! `INTERNAL` status is a failure; every refusal must be a client-error status with a message.
//!
//! `STRATA_FUZZ_EXECS` sets the number of calls (CI runs the default; `BENCHMARKS.md` records a long
//! run), `STRATA_FUZZ_SEED` replays a run.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::Device;
use strata_model::rng::SplitMix64;
use strata_model::synthetic::{write_safetensors_model, SyntheticConfig};
use strata_model::ModelFile;
use strata_proto::v1;
use strata_proto::v1::worker_server::Worker;
use strata_worker::engine::{Engine, EngineLimits};
use strata_worker::model::StageOptions;
use strata_worker::service::{Weights, WorkerIdentity, WorkerService};
use tonic::{Code, Request};

const HIDDEN: u32 = 64;
const VOCAB: u32 = 512;

/// One stage under test, and where it believes each sequence is.
struct Target {
    service: WorkerService,
    /// The epoch of the stage's load.
    epoch: u64,
    first: bool,
    positions: HashMap<u64, u32>,
}

fn tensor(rng: &mut SplitMix64, rows: u32) -> v1::Tensor {
    let dtype = if rng.chance(80) {
        v1::DType::DtypeF32 as i32
    } else {
        rng.pick(&[0, 1, 2, 3, 4, -1, 99, i32::MAX, i32::MIN])
    };
    let shape: Vec<u32> = if rng.chance(75) {
        vec![rows, HIDDEN]
    } else {
        let rank = rng.below(4);
        (0..rank)
            .map(|_| rng.pick(&[0, 1, rows, HIDDEN, HIDDEN + 1, 65_536, u32::MAX]))
            .collect()
    };
    let elements: u64 = shape
        .iter()
        .map(|&d| d as u64)
        .fold(1u64, |a, d| a.saturating_mul(d))
        .min(1 << 16);
    let mut bytes = (elements * 4) as usize;
    if rng.chance(15) {
        bytes = rng.below(4 * 4096);
    }
    let mut data = vec![0u8; bytes];
    if rng.chance(50) {
        for b in data.iter_mut() {
            *b = rng.next_u64() as u8;
        }
    }
    v1::Tensor { data, dtype, shape }
}

fn sampling(rng: &mut SplitMix64, hostile: bool) -> Option<v1::SamplingParams> {
    if !hostile {
        return Some(v1::SamplingParams {
            temperature: rng.pick(&[0.0, 0.7, 1.0, 1.5]),
            top_k: rng.pick(&[0, 1, 5, 40]),
            top_p: rng.pick(&[1.0, 0.9, 0.5]),
            seed: rng.next_u64(),
            min_p: rng.pick(&[0.0, 0.0, 0.05]),
            presence_penalty: rng.pick(&[0.0, 0.0, 0.5, -1.0]),
            frequency_penalty: rng.pick(&[0.0, 0.0, 0.3]),
            repetition_penalty: rng.pick(&[0.0, 1.0, 1.1]),
            logit_bias: if rng.chance(20) {
                vec![v1::TokenBias {
                    id: rng.below(VOCAB as usize) as u32,
                    bias: rng.pick(&[-100.0, 3.0]),
                }]
            } else {
                Vec::new()
            },
        });
    }
    if rng.chance(10) {
        return None;
    }
    Some(v1::SamplingParams {
        temperature: rng.pick(&[
            0.0,
            0.0,
            0.7,
            1.0,
            -1.0,
            f32::NAN,
            f32::INFINITY,
            1e30,
            1e-30,
        ]),
        top_k: rng.pick(&[0, 0, 1, 5, VOCAB, VOCAB + 1, u32::MAX]),
        top_p: rng.pick(&[1.0, 1.0, 0.9, 0.0, -1.0, 2.0, f32::NAN]),
        seed: rng.next_u64(),
        min_p: rng.pick(&[0.0, 0.0, 0.1, 1.0, -0.5, 2.0, f32::NAN]),
        presence_penalty: rng.pick(&[0.0, 0.0, 1.0, -2.0, 3.0, f32::NAN]),
        frequency_penalty: rng.pick(&[0.0, 0.0, 1.5, f32::INFINITY]),
        repetition_penalty: rng.pick(&[0.0, 1.0, 1.3, 0.0001, -1.0, 1e9]),
        logit_bias: (0..rng.pick(&[0, 0, 1, 3, 301]))
            .map(|_| v1::TokenBias {
                id: rng.pick(&[0, 1, VOCAB - 1, VOCAB, u32::MAX]),
                bias: rng.pick(&[1.0, -100.0, 100.0, 101.0, f32::NAN]),
            })
            .collect(),
    })
}

/// The tokens so far a coordinator would send with penalties, or hostile lists.
fn seen(rng: &mut SplitMix64, hostile: bool) -> Vec<v1::TokenCount> {
    let n = if hostile {
        rng.pick(&[0, 0, 1, 5, 5000])
    } else {
        rng.pick(&[0, 0, 1, 5])
    };
    (0..n)
        .map(|i| v1::TokenCount {
            id: if hostile && rng.chance(5) {
                rng.pick(&[VOCAB, u32::MAX])
            } else {
                i % VOCAB
            },
            generated: rng.pick(&[0, 1, 7, u32::MAX]),
        })
        .collect()
}

/// A grammar's mask: none, a valid one, or (`hostile`) one of any size and bits.
fn allowed(rng: &mut SplitMix64, hostile: bool) -> Vec<u32> {
    let words = VOCAB.div_ceil(32) as usize;
    let len = if hostile {
        rng.pick(&[0, 0, words, words, 1, words + 1, 100_000])
    } else {
        rng.pick(&[0, 0, 0, words])
    };
    let fill = if hostile {
        rng.pick(&[0, 1, u32::MAX])
    } else {
        rng.pick(&[1, u32::MAX])
    };
    vec![fill; len]
}

/// A sequence's part of a request: a plausible continuation, or (`hostile`) anything at all.
fn sequence(rng: &mut SplitMix64, target: &Target, hostile: bool) -> v1::SequenceInput {
    if !hostile {
        let seq_id = rng.below(6) as u64;
        let longest = if rng.chance(10) { 40 } else { 3 };
        let rows = 1 + rng.below(longest) as u32;
        let input = if target.first {
            let ids = (0..rows)
                .map(|_| rng.below(VOCAB as usize) as u32)
                .collect();
            v1::sequence_input::Input::Tokens(v1::TokenIds { ids })
        } else {
            let data = (0..rows * HIDDEN)
                .flat_map(|_| ((rng.below(2000) as f32 - 1000.0) / 100.0).to_le_bytes())
                .collect();
            v1::sequence_input::Input::Hidden(v1::Tensor {
                data,
                dtype: v1::DType::DtypeF32 as i32,
                shape: vec![rows, HIDDEN],
            })
        };
        let mut start_pos = target.positions.get(&seq_id).copied().unwrap_or(0);
        // Now and then a new sequence on part of another's prefix (which may since be parked).
        let mut copy_prefix_from = 0;
        if start_pos == 0 && rng.chance(15) {
            let source = rng.below(8) as u64;
            if let Some(&len) = target.positions.get(&source).filter(|&&l| l > 0) {
                copy_prefix_from = source;
                start_pos = 1 + rng.below(len as usize) as u32;
            }
        }
        return v1::SequenceInput {
            seq_id,
            start_pos,
            input: Some(input),
            sampling: sampling(rng, false),
            top_logprobs: rng.pick(&[0, 1, 5, 20]),
            request_id: String::new(),
            seen: seen(rng, false),
            allowed_tokens: allowed(rng, false),
            copy_prefix_from,
        };
    }
    let seq_id = if rng.chance(95) {
        rng.below(6) as u64
    } else {
        rng.next_u64()
    };
    let known = target.positions.get(&seq_id).copied().unwrap_or(0);
    let start_pos = match rng.below(10) {
        0..=5 => known,
        6 => known.saturating_sub(1),
        7 => known.saturating_add(1),
        8 => rng.below(600) as u32,
        _ => rng.next_u64() as u32,
    };
    let rows = if rng.chance(80) {
        1 + rng.below(4) as u32
    } else {
        rng.pick(&[0, 7, 33, 600])
    };
    let tokens_wanted = if target.first {
        rng.chance(90)
    } else {
        rng.chance(10)
    };
    let input = if rng.chance(3) {
        None
    } else if tokens_wanted {
        let ids = (0..rows)
            .map(|_| {
                if rng.chance(95) {
                    rng.below(VOCAB as usize) as u32
                } else {
                    rng.pick(&[VOCAB, VOCAB + 1, u32::MAX])
                }
            })
            .collect();
        Some(v1::sequence_input::Input::Tokens(v1::TokenIds { ids }))
    } else {
        Some(v1::sequence_input::Input::Hidden(tensor(rng, rows)))
    };
    v1::SequenceInput {
        seq_id,
        start_pos,
        input,
        sampling: sampling(rng, true),
        top_logprobs: rng.pick(&[0, 0, 1, 5, 20, 21, u32::MAX]),
        request_id: request_id(rng),
        seen: seen(rng, true),
        allowed_tokens: allowed(rng, true),
        copy_prefix_from: match rng.below(20) {
            0 => rng.below(8) as u64,
            1 => rng.next_u64(),
            _ => 0,
        },
    }
}

/// Request ids are only logged; odd ones (long, multi-byte at the cut, control characters) must
/// not matter.
fn request_id(rng: &mut SplitMix64) -> String {
    match rng.below(6) {
        0 | 1 => String::new(),
        2 => "req-1".into(),
        3 => "é".repeat(40),
        4 => "x".repeat(10_000),
        _ => "a\nb\u{0}\u{1b}[31m".into(),
    }
}

fn rows_of(input: &Option<v1::sequence_input::Input>) -> u32 {
    match input {
        Some(v1::sequence_input::Input::Tokens(t)) => t.ids.len() as u32,
        Some(v1::sequence_input::Input::Hidden(h)) => h.shape.first().copied().unwrap_or(0),
        None => 0,
    }
}

async fn stage(model: &ModelFile, layers: std::ops::Range<usize>) -> Target {
    let limits = EngineLimits {
        max_sequences: 8,
        max_batch_rows: 256,
        max_cache_bytes: Some(8 << 20),
        max_parked_bytes: Some(2 << 20),
        // The compute thread polls between jobs as on a GPU, so that path runs under the fuzzer too.
        idle_spin: Some(std::time::Duration::from_micros(200)),
    };
    let engine = Engine::start(
        Some(model.clone()),
        Device::Cpu,
        StageOptions::default(),
        limits,
        1,
    )
    .unwrap();
    let first = layers.start == 0;
    let epoch = engine.load(layers, None, None).await.unwrap().epoch;
    let identity = WorkerIdentity {
        device: "cpu".into(),
        physical_device: String::new(),
        dtype: candle_core::DType::F32,
        weights: Weights::File(Box::new(model.clone())),
        threads: 1,
    };
    Target {
        service: WorkerService::new(engine, identity),
        epoch,
        first,
        positions: HashMap::new(),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_survives_arbitrary_requests() {
    let execs = env_u64("STRATA_FUZZ_EXECS").unwrap_or(50_000);
    let seed = env_u64("STRATA_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    eprintln!("fuzz_forward: seed {seed}, {execs} calls (STRATA_FUZZ_SEED={seed} replays)");
    let dir = tempfile::tempdir().unwrap();
    let config = SyntheticConfig {
        num_layers: 2,
        ..SyntheticConfig::tiny()
    };
    write_safetensors_model(dir.path(), &config).unwrap();
    let model = ModelFile::open(dir.path()).unwrap();
    let mut targets = [stage(&model, 0..1).await, stage(&model, 1..2).await];

    let mut rng = SplitMix64::new(seed);
    let mut outcomes: HashMap<String, u64> = HashMap::new();
    let started = Instant::now();
    for exec in 0..execs {
        let target = &mut targets[rng.below(2)];
        if rng.chance(5) {
            let ids: Vec<u64> = if rng.chance(30) {
                (0..6).collect()
            } else {
                vec![rng.below(8) as u64]
            };
            // Now and then a release made for another load: refused, and nothing is freed.
            let stale = rng.chance(10);
            let request = Request::new(v1::ReleaseRequest {
                seq_ids: ids.clone(),
                epoch: if stale {
                    target.epoch ^ 1
                } else {
                    target.epoch
                },
                // Parked sequences stay as prefix sources but are never fed again.
                park: rng.chance(40),
            });
            let released = target.service.release(request).await;
            if stale {
                let status = released.expect_err("a stale release was accepted");
                assert_eq!(
                    status.code(),
                    Code::FailedPrecondition,
                    "exec {exec}, seed {seed}"
                );
                *outcomes.entry("stale release".into()).or_default() += 1;
                continue;
            }
            released.unwrap();
            for id in ids {
                target.positions.remove(&id);
            }
            *outcomes.entry("release".into()).or_default() += 1;
            continue;
        }
        let count = if rng.chance(97) {
            rng.below(4)
        } else {
            rng.pick(&[9, 300])
        };
        // Half the calls are plausible, so that state builds up and the compute, cache growth,
        // sampling and limits are reached; the other half may be anything.
        let hostile = rng.chance(50);
        let mut sequences: Vec<v1::SequenceInput> = (0..count)
            .map(|_| sequence(&mut rng, target, hostile))
            .collect();
        if !hostile {
            // A sequence appears once per call.
            let mut seen = std::collections::HashSet::new();
            sequences.retain(|s| seen.insert(s.seq_id));
        }
        let advanced: Vec<(u64, u32)> = sequences
            .iter()
            .map(|s| (s.seq_id, s.start_pos.saturating_add(rows_of(&s.input))))
            .collect();
        // A hostile call may carry another load's epoch: it must be refused before anything runs.
        let epoch = if hostile && rng.chance(5) {
            rng.next_u64()
        } else {
            target.epoch
        };
        let request = Request::new(v1::ForwardRequest {
            step_id: rng.next_u64(),
            sequences,
            epoch,
        });
        match target.service.forward(request).await {
            Ok(response) => {
                assert_eq!(
                    epoch, target.epoch,
                    "exec {exec}, seed {seed}: a stale epoch ran"
                );
                let response = response.into_inner();
                assert_eq!(
                    response.outputs.len(),
                    advanced.len(),
                    "exec {exec}, seed {seed}"
                );
                for (id, pos) in advanced {
                    target.positions.insert(id, pos);
                }
                *outcomes.entry("ok".into()).or_default() += 1;
            }
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        Code::InvalidArgument
                            | Code::NotFound
                            | Code::OutOfRange
                            | Code::ResourceExhausted
                            | Code::FailedPrecondition
                            | Code::Aborted
                    ),
                    "exec {exec}, seed {seed}: {:?} {}",
                    status.code(),
                    status.message()
                );
                assert!(!status.message().is_empty(), "exec {exec}, seed {seed}");
                if status.code() == Code::ResourceExhausted {
                    // What a coordinator does when a worker is full: free sequences. Without it
                    // the caches stay full and every later call stops at the bound.
                    let all = Request::new(v1::ReleaseRequest {
                        seq_ids: (0..8).chain(target.positions.keys().copied()).collect(),
                        epoch: target.epoch,
                        park: false,
                    });
                    target.service.release(all).await.unwrap();
                    target.positions.clear();
                }
                *outcomes.entry(format!("{:?}", status.code())).or_default() += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut summary: Vec<_> = outcomes.into_iter().collect();
    summary.sort();
    eprintln!(
        "fuzz_forward: {execs} calls in {elapsed:.1} s ({:.0}/s), 0 panics, 0 internal errors; {summary:?}",
        execs as f64 / elapsed
    );
}
