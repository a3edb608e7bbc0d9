//! Calibration passes that keep their probe stages: later passes of the same shape run on them,
//! and each must find the probes' caches back at the prefilled context (a probe's step checks
//! this, so a pass that left them where it ended fails the next one). Passes of another shape, and
//! a pass after a stage load, run on fresh probes. With either KV layout.

use candle_core::{DType, Device};
use strata_model::synthetic::{write_safetensors_model, SyntheticConfig};
use strata_model::ModelFile;
use strata_worker::engine::{Calibration, Engine, EngineLimits};
use strata_worker::model::{KvLayout, StageOptions};

fn check(c: &Calibration, rows: usize) {
    assert_eq!(c.rows, rows);
    assert!(!c.layer.is_zero(), "a layer takes time: {c:?}");
    assert!(
        c.layer_bytes > 0 && c.embedding_bytes > 0 && c.head_bytes > 0,
        "{c:?}"
    );
}

#[tokio::test]
async fn kept_probes_serve_later_passes_of_the_same_shape() {
    let dir = tempfile::tempdir().unwrap();
    let config = SyntheticConfig {
        dtype: DType::F32,
        ..SyntheticConfig::tiny()
    };
    write_safetensors_model(dir.path(), &config).unwrap();
    for kv_layout in [KvLayout::Contiguous, KvLayout::Paged] {
        let model = ModelFile::open(dir.path()).unwrap();
        let layers = model.config.num_layers;
        let options = StageOptions {
            kv_layout,
            ..StageOptions::default()
        };
        let engine = Engine::start(
            Some(model),
            Device::Cpu,
            options,
            EngineLimits::default(),
            1,
        )
        .unwrap();
        let first = engine.calibrate(4, 16, true, None).await.unwrap();
        check(&first, 4);
        // Reused probes decode from the prefilled context again: were their caches left where the
        // last pass ended, these steps would not line up with them and the pass would fail.
        for keep in [true, true, false] {
            let again = engine.calibrate(4, 16, keep, None).await.unwrap();
            check(&again, 4);
            assert_eq!(
                (again.layer_bytes, again.embedding_bytes, again.head_bytes),
                (first.layer_bytes, first.embedding_bytes, first.head_bytes),
                "{kv_layout:?}: the same probe stages"
            );
        }
        // Kept probes of another shape are not reused; a load drops them.
        check(&engine.calibrate(2, 16, true, None).await.unwrap(), 2);
        check(&engine.calibrate(4, 8, true, None).await.unwrap(), 4);
        engine.load(0..layers, None, None).await.unwrap();
        check(&engine.calibrate(4, 16, false, None).await.unwrap(), 4);
    }
}
