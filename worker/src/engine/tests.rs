//! The engine through its handle, on a tiny random model: a step either advances every sequence or
//! changes none, and calls made for another load change nothing.

use candle_core::Device;
use strata_model::synthetic::{write_safetensors_model, SyntheticConfig};
use strata_model::ModelFile;

use super::{Engine, EngineLimits, SequenceStep, StepInput, StepOutput};
use crate::model::sampling::{Sampled, SamplingParams};
use crate::model::{KvLayout, StageOptions};
use crate::WorkerError;

/// Bytes of one KV page of the tiny model (4 layers, 2 KV heads of 16, f32, 16 positions a page).
const PAGE_BYTES: usize = 2 * 4 * 2 * 16 * 16 * 4;

fn tiny_model(dir: &std::path::Path) -> ModelFile {
    write_safetensors_model(dir, &SyntheticConfig::tiny()).unwrap();
    ModelFile::open(dir).unwrap()
}

/// An engine with the whole tiny model as one stage, its KV pool bounded to `pages` pages.
async fn start(model: &ModelFile, pages: usize) -> (Engine, u64) {
    start_with(model, KvLayout::Paged, pages, None).await
}

/// The same with a choice of layout and a bound on parked caches.
async fn start_with(
    model: &ModelFile,
    kv_layout: KvLayout,
    pages: usize,
    max_parked_bytes: Option<usize>,
) -> (Engine, u64) {
    let options = StageOptions {
        kv_layout,
        ..StageOptions::default()
    };
    let limits = EngineLimits {
        max_cache_bytes: Some(pages * PAGE_BYTES),
        max_parked_bytes,
        ..EngineLimits::default()
    };
    let engine = Engine::start(Some(model.clone()), Device::Cpu, options, limits, 1).unwrap();
    let epoch = engine.load(0..4, None, None).await.unwrap().epoch;
    (engine, epoch)
}

fn step(seq_id: u64, start_pos: usize, ids: Vec<u32>) -> SequenceStep {
    SequenceStep {
        seq_id,
        start_pos,
        input: StepInput::Tokens(ids),
        sampling: Some(SamplingParams::GREEDY),
        top_logprobs: 0,
        seen: Vec::new(),
        allowed: Vec::new(),
        copy_from: None,
    }
}

fn sampled(outputs: Vec<(u64, StepOutput)>) -> Vec<(u64, Sampled)> {
    outputs
        .into_iter()
        .map(|(id, out)| match out {
            StepOutput::Sampled(s) => (id, s),
            StepOutput::Hidden(_) => panic!("a last stage returned hidden states"),
        })
        .collect()
}

fn prompt(n: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 37 + 11) % 512).collect()
}

#[tokio::test]
async fn a_step_that_runs_out_of_kv_pages_leaves_every_sequence_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // Four pages: sequence 1's 20 positions take two, and only two more sequences fit.
    let (engine, epoch) = start(&model, 4).await;
    engine
        .forward(epoch, vec![step(1, 0, prompt(20))])
        .await
        .unwrap();
    let before = engine.stats();

    let mut too_many = vec![step(1, 20, vec![5])];
    too_many.extend((2..6).map(|id| step(id, 0, vec![7])));
    let refused = engine.forward(epoch, too_many).await.unwrap_err();
    assert!(
        matches!(&refused, WorkerError::ResourceExhausted(m) if m.contains("KV pool is full")),
        "{refused:?}"
    );
    let after = engine.stats();
    assert_eq!(after.active_sequences, 1);
    assert_eq!(after.cached_positions, before.cached_positions);
    assert_eq!(after.cache_bytes, before.cache_bytes);

    // Sequence 1 goes on as if the failed step never ran, and the new sequences' pages were freed.
    let mut retry = vec![step(1, 20, vec![5])];
    retry.extend((2..4).map(|id| step(id, 0, vec![7])));
    let got = sampled(engine.forward(epoch, retry).await.unwrap().outputs);

    let (reference, reference_epoch) = start(&model, 64).await;
    reference
        .forward(reference_epoch, vec![step(1, 0, prompt(20))])
        .await
        .unwrap();
    let mut same = vec![step(1, 20, vec![5])];
    same.extend((2..4).map(|id| step(id, 0, vec![7])));
    let want = sampled(
        reference
            .forward(reference_epoch, same)
            .await
            .unwrap()
            .outputs,
    );
    assert_eq!(got.len(), 3);
    for ((id, got), (_, want)) in got.iter().zip(&want) {
        assert_eq!(got.id, want.id, "sequence {id}");
        assert!((got.logprob - want.logprob).abs() < 1e-5, "sequence {id}");
    }
    assert_eq!(engine.stats().cached_positions, 21 + 2);
}

#[tokio::test]
async fn a_refused_step_changes_no_cache() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (engine, epoch) = start(&model, 64).await;
    engine
        .forward(epoch, vec![step(1, 0, prompt(3)), step(2, 0, prompt(4))])
        .await
        .unwrap();
    // Sequence 1 would decode, but sequence 2's position is wrong: neither moves.
    let refused = engine
        .forward(epoch, vec![step(1, 3, vec![1]), step(2, 5, vec![1])])
        .await
        .unwrap_err();
    assert!(
        matches!(refused, WorkerError::InvalidArgument(_)),
        "{refused:?}"
    );
    assert_eq!(engine.stats().cached_positions, 7);
    engine
        .forward(epoch, vec![step(1, 3, vec![1]), step(2, 4, vec![1])])
        .await
        .unwrap();
    assert_eq!(engine.stats().cached_positions, 9);
}

#[tokio::test]
async fn calls_for_another_load_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (engine, old) = start(&model, 64).await;
    engine
        .forward(old, vec![step(1, 0, prompt(3))])
        .await
        .unwrap();
    assert_eq!(
        engine
            .release(old, vec![1, 9], false)
            .await
            .unwrap()
            .released,
        1
    );
    engine
        .forward(old, vec![step(1, 0, prompt(3))])
        .await
        .unwrap();

    // A second load (another coordinator) drops every sequence and takes a new epoch.
    let new = engine.load(0..4, None, None).await.unwrap().epoch;
    assert_ne!(new, old);
    assert_eq!(engine.stats().active_sequences, 0);
    engine
        .forward(new, vec![step(2, 0, prompt(3))])
        .await
        .unwrap();
    for refused in [
        engine.forward(old, vec![step(3, 0, prompt(3))]).await.err(),
        engine.release(old, vec![2], false).await.err(),
    ] {
        assert!(
            matches!(&refused, Some(WorkerError::FailedPrecondition(m)) if m.contains("not the loaded one")),
            "{refused:?}"
        );
    }
    let stats = engine.stats();
    assert_eq!(
        (stats.epoch, stats.active_sequences, stats.cached_positions),
        (new, 1, 3)
    );
}

#[tokio::test]
async fn nothing_runs_before_a_stage_is_loaded_and_warmup_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let engine = Engine::start(
        Some(model.clone()),
        Device::Cpu,
        StageOptions::default(),
        EngineLimits::default(),
        1,
    )
    .unwrap();
    let refused = engine
        .forward(0, vec![step(1, 0, vec![1])])
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, WorkerError::FailedPrecondition(m) if m.contains("LoadStage")),
        "{refused:?}"
    );
    assert!(engine.warmup(8).await.is_err());
    engine.load(0..4, None, None).await.unwrap();
    engine.warmup(40).await.unwrap();
    let stats = engine.stats();
    assert_eq!((stats.active_sequences, stats.cache_bytes), (0, 0));
}

/// Runs `prompt` then `decode` greedy tokens on sequence `id` from position `from` (its first step
/// copying from `source`, if any); returns the tokens sampled after each step.
async fn generate(
    engine: &Engine,
    epoch: u64,
    id: u64,
    source: Option<u64>,
    from: usize,
    prompt: &[u32],
    decode: usize,
) -> Vec<u32> {
    let first = SequenceStep {
        copy_from: source,
        ..step(id, from, prompt[from..].to_vec())
    };
    let mut out = sampled(engine.forward(epoch, vec![first]).await.unwrap().outputs);
    let mut tokens = vec![out.remove(0).1.id];
    for i in 0..decode {
        let next = step(id, prompt.len() + i, vec![*tokens.last().unwrap()]);
        let mut out = sampled(engine.forward(epoch, vec![next]).await.unwrap().outputs);
        tokens.push(out.remove(0).1.id);
    }
    tokens
}

#[tokio::test]
async fn a_sequence_started_on_a_parked_prefix_generates_what_a_cold_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    for layout in [KvLayout::Contiguous, KvLayout::Paged] {
        let (engine, epoch) = start_with(&model, layout, 64, None).await;
        let turn_one = prompt(30);
        let cold_one = generate(&engine, epoch, 1, None, 0, &turn_one, 4).await;
        // Turn two: turn one, its answer, and more.
        let mut turn_two = turn_one.clone();
        turn_two.extend(&cold_one[..4]);
        turn_two.extend(prompt(9));
        let report = engine.release(epoch, vec![1], true).await.unwrap();
        assert_eq!(
            (report.released, report.evicted.len()),
            (1, 0),
            "{layout:?}"
        );
        let stats = engine.stats();
        assert_eq!((stats.active_sequences, stats.parked_sequences), (0, 1));

        // 34 positions are parked (30 of the prompt, 4 decoded): copy them, compute the rest.
        let warm = generate(&engine, epoch, 2, Some(1), 34, &turn_two, 6).await;
        let cold = generate(&engine, epoch, 3, None, 0, &turn_two, 6).await;
        assert_eq!(warm, cold, "{layout:?}");
        // A copy of part of an active sequence's prefix works too, and leaves the source as it was.
        let partial = generate(&engine, epoch, 4, Some(3), 20, &turn_two, 6).await;
        assert_eq!(partial, cold, "{layout:?}");
        let next = step(3, turn_two.len() + 6, vec![*cold.last().unwrap()]);
        engine.forward(epoch, vec![next]).await.unwrap();

        // A parked sequence cannot be fed, and one released without `park` is gone.
        let refused = engine
            .forward(epoch, vec![step(1, 34, vec![5])])
            .await
            .unwrap_err();
        assert!(
            matches!(refused, WorkerError::InvalidArgument(_)),
            "{refused:?}"
        );
        assert_eq!(
            engine
                .release(epoch, vec![1], false)
                .await
                .unwrap()
                .released,
            1
        );
        let gone = SequenceStep {
            copy_from: Some(1),
            ..step(5, 20, turn_two[20..].to_vec())
        };
        let refused = engine.forward(epoch, vec![gone]).await.unwrap_err();
        assert!(
            matches!(&refused, WorkerError::Aborted(m) if m.contains("prefix source 1")),
            "{refused:?}"
        );
        assert_eq!(engine.stats().parked_sequences, 0);
    }
}

#[tokio::test]
async fn parked_caches_give_way_to_running_sequences_and_stay_within_their_bound() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    for layout in [KvLayout::Contiguous, KvLayout::Paged] {
        // 16 pages in all, at most 6 of them parked.
        let (engine, epoch) = start_with(&model, layout, 16, Some(6 * PAGE_BYTES)).await;
        let mut dropped = Vec::new();
        for id in 1..=4u64 {
            engine
                .forward(epoch, vec![step(id, 0, prompt(30))])
                .await
                .unwrap();
            dropped.extend(engine.release(epoch, vec![id], true).await.unwrap().evicted);
            assert!(engine.stats().parked_bytes <= 6 * PAGE_BYTES, "{layout:?}");
        }
        // Two pages of 30 positions (or 32 rows) each: three fit in six pages, the oldest went.
        assert_eq!(dropped, [1], "{layout:?}");
        assert_eq!(engine.stats().parked_sequences, 3);
        // A prompt that needs the whole bound pushes the parked caches out, oldest first.
        let big = engine
            .forward(epoch, vec![step(9, 0, prompt(100))])
            .await
            .unwrap();
        assert!(!big.evicted.is_empty(), "{layout:?}");
        assert_eq!(big.evicted[0], 2, "{layout:?}");
        let stats = engine.stats();
        assert!(
            stats.cache_bytes + stats.parked_bytes <= 16 * PAGE_BYTES,
            "{layout:?}: {stats:?}"
        );
    }
}

/// The hidden states a first stage returns for one sequence.
fn hidden(outputs: Vec<(u64, StepOutput)>) -> Vec<f32> {
    match outputs.into_iter().next() {
        Some((_, StepOutput::Hidden(h))) => h.flatten_all().unwrap().to_vec1().unwrap(),
        _ => panic!("a first stage returned no hidden states"),
    }
}

#[tokio::test]
async fn rows_computed_after_a_prefix_copy_are_a_cold_prefills_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let config = SyntheticConfig {
        context_length: 1024,
        ..SyntheticConfig::tiny()
    };
    write_safetensors_model(dir.path(), &config).unwrap();
    let model = ModelFile::open(dir.path()).unwrap();
    let hidden_size = config.hidden_size;
    for layout in [KvLayout::Contiguous, KvLayout::Paged] {
        let options = StageOptions {
            kv_layout: layout,
            ..StageOptions::default()
        };
        let engine = Engine::start(
            Some(model.clone()),
            Device::Cpu,
            options,
            EngineLimits::default(),
            1,
        )
        .unwrap();
        // A first stage: its output is the hidden states, not a sampled token.
        let epoch = engine.load(0..2, None, None).await.unwrap().epoch;
        // Suffixes of many rows and of few (whose attention products gemm would otherwise sum in
        // another order), over short and long histories (past gemm's 512-position blocking). At
        // least 10 rows: this model's f32 projections are candle matmuls too, which sum in another
        // order for fewer (a GGUF model's quantized ones are strata's kernels, the same for any
        // rows: `cpu_kernels/tests.rs`).
        for (len, copied) in [(12, 2), (40, 24), (200, 190), (700, 600), (700, 690)] {
            let tokens = prompt(len as u32);
            let cold = hidden(
                engine
                    .forward(epoch, vec![step(1, 0, tokens.clone())])
                    .await
                    .unwrap()
                    .outputs,
            );
            let fork = SequenceStep {
                copy_from: Some(1),
                ..step(2, copied, tokens[copied..].to_vec())
            };
            let warm = hidden(engine.forward(epoch, vec![fork]).await.unwrap().outputs);
            let differ = cold[copied * hidden_size..]
                .iter()
                .zip(&warm)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                (warm.len(), differ),
                ((len - copied) * hidden_size, 0),
                "{layout:?}: {len} positions, {copied} copied"
            );
            engine.release(epoch, vec![1, 2], false).await.unwrap();
        }
    }
}

#[tokio::test]
async fn cpu_attention_kernel_gives_candles_bits_within_one_gemm_block() {
    // Heads of 16, 64 and 128 dimensions (the tiny model's, SmolLM2's and Qwen2.5-1.5B's), two
    // query heads per key/value head.
    for hidden_size in [64, 256, 512] {
        let dir = tempfile::tempdir().unwrap();
        let config = SyntheticConfig {
            hidden_size,
            intermediate_size: 2 * hidden_size,
            context_length: 1024,
            ..SyntheticConfig::tiny()
        };
        write_safetensors_model(dir.path(), &config).unwrap();
        let model = ModelFile::open(dir.path()).unwrap();
        let start = |no_cpu_attention| {
            let options = StageOptions {
                ablations: crate::model::Ablations {
                    no_cpu_attention,
                    ..Default::default()
                },
                ..StageOptions::default()
            };
            Engine::start(
                Some(model.clone()),
                Device::Cpu,
                options,
                EngineLimits::default(),
                1,
            )
            .unwrap()
        };
        let (kernel, candle) = (start(false), start(true));
        let kernel_epoch = kernel.load(0..2, None, None).await.unwrap().epoch;
        let candle_epoch = candle.load(0..2, None, None).await.unwrap().epoch;
        // Prompts short and long (to gemm's 512-position block), then decode steps; and a prompt
        // continued in a second prompt step.
        for (len, chunk) in [(3, 3), (40, 40), (300, 300), (480, 480), (200, 150)] {
            let tokens = prompt(len);
            let mut steps = vec![(0, tokens[..chunk as usize].to_vec())];
            if chunk < len {
                steps.push((chunk as usize, tokens[chunk as usize..].to_vec()));
            }
            for t in 0..(512 - len as usize).min(30) {
                steps.push((len as usize + t, vec![(t as u32 * 7) % 512]));
            }
            for (n, (at, ids)) in steps.into_iter().enumerate() {
                let a = kernel.forward(kernel_epoch, vec![step(1, at, ids.clone())]);
                let a = hidden(a.await.unwrap().outputs);
                let b = candle.forward(candle_epoch, vec![step(1, at, ids)]);
                let b = hidden(b.await.unwrap().outputs);
                let differ = a
                    .iter()
                    .zip(&b)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    (a.len(), differ),
                    (b.len(), 0),
                    "hidden {hidden_size}: prompt {len} ({chunk} first), step {n}"
                );
            }
            kernel.release(kernel_epoch, vec![1], false).await.unwrap();
            candle.release(candle_epoch, vec![1], false).await.unwrap();
        }
    }
}
