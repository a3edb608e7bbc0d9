//! CUDA-only checks of a stage on the GPU against the same stage on the CPU.
//!
//! Marked `ignore` unless the crate is built with `--features cuda`, so CI (a CPU build) lists them as
//! ignored with the reason; `bench/gpu.sh` builds and runs them on the GPU host.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use strata_model::synthetic::{write_safetensors_model, SyntheticConfig};
use strata_model::ModelFile;
use strata_worker::model::{KvLayout, Segment, Stage, StageInput, StageOptions};

mod common;

/// Logits of a 3-sequence micro-batch (a prefill beside two decodes) after two priming steps.
fn logits(model: &ModelFile, device: &Device, dtype: DType, layout: KvLayout) -> Vec<f32> {
    let options = StageOptions {
        kv_layout: layout,
        ..StageOptions::default()
    };
    let steps: [&[(usize, usize)]; 3] = [
        &[(0, 6), (1, 3)],
        &[(0, 1), (1, 1)],
        &[(2, 11), (0, 1), (1, 1)],
    ];
    last_logits(model, device, dtype, options, &steps)
}

/// The last step's logits after running `steps` (each a list of `(sequence, new positions)`).
fn last_logits(
    model: &ModelFile,
    device: &Device,
    dtype: DType,
    options: StageOptions,
    steps: &[&[(usize, usize)]],
) -> Vec<f32> {
    let n = model.config.num_layers;
    let mut stage = Stage::load(model, 0..n, device, dtype, options).unwrap();
    let sequences = steps
        .iter()
        .flat_map(|s| s.iter().map(|p| p.0 + 1))
        .max()
        .unwrap_or(0);
    let mut caches: Vec<Option<_>> = (0..sequences).map(|_| None).collect();
    let mut last = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let out = common::run_step(&mut stage, &mut caches, step, |rows| {
            StageInput::Tokens((0..rows).map(|j| ((j * 31 + i * 7) % 500) as u32).collect())
        });
        last = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    }
    last
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f32 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

fn tiny_model(dir: &std::path::Path) -> ModelFile {
    let config = SyntheticConfig {
        dtype: DType::F32,
        ..SyntheticConfig::tiny()
    };
    write_safetensors_model(dir, &config).unwrap();
    ModelFile::open(dir).unwrap()
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "CUDA-only: needs --features cuda and a GPU (bench/gpu.sh runs it)"
)]
fn cuda_stage_matches_the_cpu_in_f32_with_either_kv_layout() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let gpu = Device::new_cuda(0).unwrap();
    let cpu = logits(&model, &Device::Cpu, DType::F32, KvLayout::Contiguous);
    for layout in [KvLayout::Paged, KvLayout::Contiguous] {
        let cuda = logits(&model, &gpu, DType::F32, layout);
        let err = rel_l2(&cuda, &cpu);
        eprintln!("cuda f32 {layout:?} vs cpu f32: rel L2 {err:.2e}");
        assert!(err < 1e-4, "{layout:?}: rel L2 {err}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "CUDA-only: needs --features cuda and a GPU (bench/gpu.sh runs it)"
)]
fn cuda_stage_in_bf16_and_f16_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let gpu = Device::new_cuda(0).unwrap();
    let reference = logits(&model, &Device::Cpu, DType::F32, KvLayout::Contiguous);
    for dtype in [DType::BF16, DType::F16] {
        let half = logits(&model, &gpu, dtype, KvLayout::Paged);
        let err = rel_l2(&half, &reference);
        eprintln!("cuda {dtype:?} vs cpu f32: rel L2 {err:.2e}");
        assert!(err < 0.05, "{dtype:?}: rel L2 {err}");
    }
}

/// strata's CUDA kernels (decode attention and the RoPE + pool write of `paged_attention.cu`, add +
/// RMSNorm and SiLU · up of `fused_ops.cu`) against candle's primitives and the CPU, in every dtype,
/// on heads of 64 (TinyLlama's) with histories longer than one pass of the block's warps, of
/// different lengths in one batch, and long enough for the wide attention kernel.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "CUDA-only: needs --features cuda and a GPU (bench/gpu.sh runs it)"
)]
fn fused_kernels_match_the_unfused_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = SyntheticConfig {
        dtype: DType::F32,
        hidden_size: 128,
        num_heads: 2,
        num_kv_heads: 1,
        intermediate_size: 256,
        ..SyntheticConfig::tiny()
    };
    write_safetensors_model(dir.path(), &config).unwrap();
    let model = ModelFile::open(dir.path()).unwrap();
    // Histories of 5 to 75 positions use the 8-warp kernel; sequence 3 (400 positions) makes the
    // last two decode steps take the wide one.
    let steps: [&[(usize, usize)]; 7] = [
        &[(0, 70), (1, 37)],
        &[(0, 1), (1, 1)],
        &[(2, 5), (0, 1), (1, 1)],
        &[(0, 1), (1, 1), (2, 1)],
        &[(2, 1), (0, 1), (1, 1), (3, 400)],
        &[(3, 1), (0, 1), (1, 1), (2, 1)],
        &[(0, 1), (3, 1)],
    ];
    let options = |layout, fused_kernels: bool| StageOptions {
        kv_layout: layout,
        ablations: strata_worker::model::Ablations {
            no_fused_kernels: !fused_kernels,
            ..Default::default()
        },
        ..StageOptions::default()
    };
    let cpu = last_logits(
        &model,
        &Device::Cpu,
        DType::F32,
        options(KvLayout::Contiguous, false),
        &steps,
    );
    let gpu = Device::new_cuda(0).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let fused = last_logits(&model, &gpu, dtype, options(KvLayout::Paged, true), &steps);
        let unfused = last_logits(&model, &gpu, dtype, options(KvLayout::Paged, false), &steps);
        let (fused_err, unfused_err) = (rel_l2(&fused, &cpu), rel_l2(&unfused, &cpu));
        eprintln!(
            "{dtype:?}: fused kernel vs cpu f32 rel L2 {fused_err:.2e}, unfused {unfused_err:.2e}"
        );
        if dtype == DType::F32 {
            assert!(fused_err < 1e-5, "f32 fused: rel L2 {fused_err}");
        } else {
            // Half-precision rounding dominates both; the kernel keeps its sums in f32.
            assert!(
                fused_err <= 1.2 * unfused_err + 1e-3,
                "{dtype:?}: fused {fused_err} vs unfused {unfused_err}"
            );
        }
    }
}

/// The step's tensors stay on the GPU: nothing in a forward pass silently falls back to the host.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "CUDA-only: needs --features cuda and a GPU (bench/gpu.sh runs it)"
)]
fn a_cuda_stage_returns_its_output_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let gpu = Device::new_cuda(0).unwrap();
    let n = model.config.num_layers;
    let mut stage =
        Stage::load(&model, 0..n / 2, &gpu, DType::BF16, StageOptions::default()).unwrap();
    let mut caches = vec![stage.new_cache(4).unwrap()];
    let seg = [Segment {
        offset: 0,
        len: 4,
        start_pos: 0,
    }];
    let out: Tensor = stage
        .forward(StageInput::Tokens(vec![1, 2, 3, 4]), &seg, &mut caches)
        .unwrap();
    assert!(out.device().is_cuda());
    assert_eq!(out.dtype(), DType::BF16);
}

/// A CUDA worker reports the GPU's memory (what the planner and the KV bound use), not the host's:
/// a 512 MiB tensor takes its size out of what the device reports free.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "CUDA-only: needs --features cuda and a GPU (bench/gpu.sh runs it)"
)]
fn a_cuda_worker_reports_the_gpus_memory() {
    let gpu = Device::new_cuda(0).unwrap();
    let host = strata_worker::device::memory(&Device::Cpu);
    let before = strata_worker::device::memory(&gpu);
    assert!(
        before.total > 0 && before.available <= before.total,
        "{before:?}"
    );
    assert_ne!(before.total, host.total, "the host's memory, not the GPU's");
    let held = Tensor::zeros((512, 1 << 20), DType::U8, &gpu).unwrap();
    gpu.synchronize().unwrap();
    let after = strata_worker::device::memory(&gpu);
    assert!(
        before.available - after.available >= 500 << 20,
        "free before {} MiB, with 512 MiB held {} MiB",
        before.available >> 20,
        after.available >> 20
    );
    drop(held);
}

/// Two workers on one GPU name the same physical device, the UUID `nvidia-smi -L` prints for it.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "CUDA-only: needs --features cuda and a GPU (bench/gpu.sh runs it)"
)]
fn workers_on_one_gpu_name_the_same_physical_device() {
    let first = strata_worker::device::physical_id(&Device::new_cuda(0).unwrap());
    let second = strata_worker::device::physical_id(&Device::new_cuda(0).unwrap());
    assert!(first.starts_with("GPU-") && first.len() == 40, "{first:?}");
    assert_eq!(first, second);
    match std::process::Command::new("nvidia-smi").arg("-L").output() {
        Ok(listing) => {
            let listing = String::from_utf8_lossy(&listing.stdout);
            assert!(listing.contains(&first), "{first} not in:\n{listing}");
        }
        Err(e) => eprintln!("nvidia-smi not run ({e}); UUID format checked only"),
    }
}

/// Greedy tokens reduced on the GPU equal the host sampler's, ties (lowest index) included.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "CUDA-only: needs --features cuda and a GPU (bench/gpu.sh runs it)"
)]
fn greedy_rows_on_the_gpu_match_the_host() {
    use strata_worker::model::sampling::{greedy_rows, sample, SamplingParams};
    let (rows, vocab) = (32, 32000);
    let mut values: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 2654435761usize) % 100_003) as f32 / 997.0)
        .collect();
    // Row r's maximum appears twice, the first time at index 7r + 3.
    for r in 0..rows {
        values[r * vocab + 7 * r + 3] = 500.0;
        values[r * vocab + vocab - 1 - r] = 500.0;
    }
    let gpu = Device::new_cuda(0).unwrap();
    let logits = Tensor::from_vec(values.clone(), (rows, vocab), &gpu).unwrap();
    // The fused kernel and candle's reductions, each against the host sampler.
    for fused in [true, false] {
        let (ids, logprobs) = greedy_rows(&logits, fused).unwrap();
        for r in 0..rows {
            let host = sample(
                &values[r * vocab..(r + 1) * vocab],
                &SamplingParams::GREEDY,
                &[],
                &[],
                0,
                0,
            );
            assert_eq!(ids[r], host.id, "row {r}, fused {fused}");
            assert_eq!(ids[r] as usize, 7 * r + 3);
            assert!(
                (logprobs[r] - host.logprob).abs() < 1e-4,
                "row {r}, fused {fused}: {} vs {}",
                logprobs[r],
                host.logprob
            );
        }
    }
    // A row of NaNs has no largest value: the kernel says so (the engine then samples it on the
    // host), and the rows beside it are unaffected.
    let mut with_nan = values[..2 * vocab].to_vec();
    with_nan[vocab..].fill(f32::NAN);
    let logits = Tensor::from_vec(with_nan, (2, vocab), &gpu).unwrap();
    let (ids, _) = greedy_rows(&logits, true).unwrap();
    assert_eq!(ids[0], 3);
    assert_eq!(ids[1], u32::MAX);
}

/// Decode steps replayed as CUDA graphs give the same logits, bit for bit, as the same steps run op
/// by op: through batch sizes that come and go, histories crossing a graph's length bucket (256)
/// and the wide attention kernel's threshold, a pool that grows mid-run, and a later stage fed
/// hidden states.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "CUDA-only: needs --features cuda and a GPU (bench/gpu.sh runs it)"
)]
fn decode_steps_replayed_as_cuda_graphs_match_eager_steps() {
    let dir = tempfile::tempdir().unwrap();
    let config = SyntheticConfig {
        dtype: DType::F32,
        context_length: 2048,
        ..SyntheticConfig::tiny()
    };
    write_safetensors_model(dir.path(), &config).unwrap();
    let model = ModelFile::open(dir.path()).unwrap();
    let gpu = Device::new_cuda(0).unwrap();
    let n = model.config.num_layers;
    let options = |graphs: bool| StageOptions {
        kv_layout: KvLayout::Paged,
        ablations: strata_worker::model::Ablations {
            no_cuda_graphs: !graphs,
            ..Default::default()
        },
        ..StageOptions::default()
    };
    // Sequence 0 decodes from 200 to 330 positions (crossing 256); sequence 1 joins at step 20
    // and leaves at step 90; sequence 2's 1000-position prompt at step 100 grows the pool
    // past its first 1024 positions.
    let mut steps: Vec<Vec<(usize, usize)>> = vec![vec![(0, 200)]];
    for i in 0..130 {
        let mut step = vec![(0, 1)];
        match i {
            20 => step.push((1, 9)),
            21..=90 => step.push((1, 1)),
            100 => step.push((2, 1000)),
            101.. => step.push((2, 1)),
            _ => {}
        }
        steps.push(step);
    }
    let run = |graphs: bool| -> Vec<Vec<f32>> {
        let mut first = Stage::load(&model, 0..n / 2, &gpu, DType::F32, options(graphs)).unwrap();
        let mut last = Stage::load(&model, n / 2..n, &gpu, DType::F32, options(graphs)).unwrap();
        let mut first_caches: Vec<Option<_>> = (0..3).map(|_| None).collect();
        let mut last_caches: Vec<Option<_>> = (0..3).map(|_| None).collect();
        steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let hidden = common::run_step(&mut first, &mut first_caches, step, |rows| {
                    StageInput::Tokens((0..rows).map(|j| ((j * 31 + i * 7) % 500) as u32).collect())
                });
                let logits = common::run_step(&mut last, &mut last_caches, step, |_| {
                    StageInput::Hidden(hidden)
                });
                logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect()
    };
    let (graphed, eager) = (run(true), run(false));
    for (i, (g, e)) in graphed.iter().zip(&eager).enumerate() {
        assert_eq!(g.len(), e.len(), "step {i}");
        let same = g.iter().zip(e).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "step {i}: rel L2 {:.2e}", rel_l2(g, e));
    }
    eprintln!(
        "{} steps identical with and without CUDA graphs",
        steps.len()
    );
}

/// A 2-layer Llama GGUF of random weights (hidden 128, 2 heads of 64, 1 kv head, ffn 256), every
/// matrix in `Q8_0` except the value projections, in `value_type`.
fn tiny_gguf(path: &std::path::Path, value_type: GgmlDType) -> ModelFile {
    use candle_core::quantized::gguf_file::{self, Value};
    let (hidden, ffn, vocab, layers, kv) = (128usize, 256usize, 512usize, 2usize, 64usize);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut random = |shape: (usize, usize), scale: f32| {
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    };
    let quantized = |t: Tensor, dtype| QTensor::quantize(&t, dtype).unwrap();
    let norm = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            quantized(random((vocab, hidden), 2.0), GgmlDType::Q8_0),
        ),
        ("output_norm.weight".into(), norm(hidden)),
        (
            "output.weight".into(),
            quantized(random((vocab, hidden), 0.2), GgmlDType::Q8_0),
        ),
    ];
    for i in 0..layers {
        let b = |name: &str| format!("blk.{i}.{name}.weight");
        tensors.push((b("attn_norm"), norm(hidden)));
        tensors.push((b("ffn_norm"), norm(hidden)));
        for (name, shape, dtype) in [
            ("attn_q", (hidden, hidden), GgmlDType::Q8_0),
            ("attn_k", (kv, hidden), GgmlDType::Q8_0),
            ("attn_v", (kv, hidden), value_type),
            ("attn_output", (hidden, hidden), GgmlDType::Q8_0),
            ("ffn_gate", (ffn, hidden), GgmlDType::Q8_0),
            ("ffn_up", (ffn, hidden), GgmlDType::Q8_0),
            ("ffn_down", (hidden, ffn), GgmlDType::Q8_0),
        ] {
            tensors.push((b(name), quantized(random(shape, 0.3), dtype)));
        }
    }
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(layers as u32)),
        ("llama.context_length", Value::U32(1024)),
        ("llama.embedding_length", Value::U32(hidden as u32)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    ModelFile::open(path).unwrap()
}

/// A quantized GGUF stage on CUDA stacks q/k/v (and gate/up) of one format into one matmul and
/// rotates and writes keys and values in one kernel with GGUF's interleaved RoPE pairing, also
/// where the formats differ and the separate projections are joined for the kernel: the same
/// logits as the unfused path (separate matmuls, candle's RoPE and scatter), and close to the CPU.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "CUDA-only: needs --features cuda and a GPU (bench/gpu.sh runs it)"
)]
fn quantized_projections_stacked_on_the_gpu_match_the_unfused_path() {
    let dir = tempfile::tempdir().unwrap();
    let steps: [&[(usize, usize)]; 5] = [
        &[(0, 40), (1, 9)],
        &[(0, 1), (1, 1)],
        &[(2, 5), (0, 1), (1, 1)],
        &[(0, 1), (1, 1), (2, 1)],
        &[(2, 1), (0, 1)],
    ];
    let options = |layout, fused: bool| StageOptions {
        kv_layout: layout,
        ablations: strata_worker::model::Ablations {
            no_fused_kernels: !fused,
            no_fused_projections: !fused,
            ..Default::default()
        },
        ..StageOptions::default()
    };
    let gpu = Device::new_cuda(0).unwrap();
    for (value_type, stacked_layers) in [(GgmlDType::Q8_0, 2), (GgmlDType::Q4_0, 0)] {
        let model = tiny_gguf(&dir.path().join(format!("{value_type:?}.gguf")), value_type);
        let stage = Stage::load(
            &model,
            0..2,
            &gpu,
            DType::F32,
            options(KvLayout::Paged, true),
        );
        assert_eq!(
            stage.unwrap().fusions(),
            (stacked_layers, true),
            "{value_type:?}"
        );
        let fused = last_logits(
            &model,
            &gpu,
            DType::F32,
            options(KvLayout::Paged, true),
            &steps,
        );
        let unfused = last_logits(
            &model,
            &gpu,
            DType::F32,
            options(KvLayout::Paged, false),
            &steps,
        );
        let cpu = last_logits(
            &model,
            &Device::Cpu,
            DType::F32,
            options(KvLayout::Contiguous, false),
            &steps,
        );
        let (err, cpu_err) = (rel_l2(&fused, &unfused), rel_l2(&fused, &cpu));
        eprintln!(
            "values in {value_type:?}: fused vs unfused rel L2 {err:.2e}, vs cpu {cpu_err:.2e}"
        );
        assert!(err < 1e-4, "{value_type:?}: fused vs unfused rel L2 {err}");
        // The CPU quantizes activations to its own 8-bit blocks, CUDA to q8_1.
        assert!(
            cpu_err < 3e-2,
            "{value_type:?}: fused vs cpu rel L2 {cpu_err}"
        );
    }
}
