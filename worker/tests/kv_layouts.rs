//! The paged KV layout (GPU stages' default) against the contiguous one (CPU's), on the same f32
//! model and the same ragged micro-batches: sequences join at different steps, prompts arrive in
//! chunks beside decode rows, and a sequence leaves and its pages go to a newcomer. The outputs of
//! every step must agree to float rounding (the padded batch sums in another order).

use candle_core::{DType, Device, Tensor};
use strata_model::synthetic::{write_safetensors_model, SyntheticConfig};
use strata_model::ModelFile;
use strata_worker::model::{KvLayout, Stage, StageInput, StageOptions};

mod common;

/// One step: `(sequence, new positions)` per row group.
type Step = Vec<(usize, usize)>;

fn steps() -> Vec<Step> {
    vec![
        vec![(0, 5)],
        vec![(0, 1), (1, 9)],
        vec![(1, 1), (0, 1), (2, 3)],
        vec![(2, 1), (1, 1), (0, 1)],
        vec![(3, 20), (2, 1), (0, 1)],
        vec![(3, 1), (2, 1), (0, 1), (1, 1)],
        // Sequence 1 has left; 4 arrives and takes its pages.
        vec![(0, 1), (4, 7), (3, 1)],
        vec![(4, 1), (0, 1), (2, 1), (3, 1)],
        vec![(4, 2), (0, 1)],
    ]
}

fn run(model: &ModelFile, layout: KvLayout, last_stage: bool) -> Vec<Vec<f32>> {
    let n = model.config.num_layers;
    let layers = if last_stage { n / 2..n } else { 0..n / 2 };
    let options = StageOptions {
        kv_layout: layout,
        ..StageOptions::default()
    };
    let mut stage = Stage::load(model, layers, &Device::Cpu, DType::F32, options).unwrap();
    let hidden = model.config.hidden_size;
    let mut caches: Vec<Option<_>> = (0..5).map(|_| None).collect();
    let mut outputs = Vec::new();
    for (i, step) in steps().into_iter().enumerate() {
        if i == 6 {
            caches[1] = None;
        }
        let out = common::run_step(&mut stage, &mut caches, &step, |rows| {
            if last_stage {
                let values: Vec<f32> = (0..rows * hidden)
                    .map(|j| ((j * 7919 + i * 31) % 1000) as f32 / 500.0 - 1.0)
                    .collect();
                StageInput::Hidden(Tensor::from_vec(values, (rows, hidden), &Device::Cpu).unwrap())
            } else {
                StageInput::Tokens((0..rows).map(|j| ((j * 13 + i) % 500) as u32).collect())
            }
        });
        outputs.push(out.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    outputs
}

#[test]
fn paged_and_contiguous_caches_give_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let config = SyntheticConfig {
        dtype: DType::F32,
        ..SyntheticConfig::tiny()
    };
    write_safetensors_model(dir.path(), &config).unwrap();
    let model = ModelFile::open(dir.path()).unwrap();
    for last_stage in [false, true] {
        let contiguous = run(&model, KvLayout::Contiguous, last_stage);
        let paged = run(&model, KvLayout::Paged, last_stage);
        for (i, (a, b)) in contiguous.iter().zip(&paged).enumerate() {
            assert_eq!(a.len(), b.len(), "step {i}");
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "step {i} (last stage: {last_stage}): max difference {diff} (scale {scale})"
            );
        }
    }
}
