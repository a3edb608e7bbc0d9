//! Times strata's Q8_0 kernel against candle's on a GGUF file's `token_embd.weight` (SmolLM2's tied
//! output head) at batch 1 and 8: `cargo run --release -p strata-worker --example q8_0_head -- MODEL.gguf`
//! (`RAYON_NUM_THREADS` sets the threads).

use std::time::{Duration, Instant};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use strata_worker::model::q8_0::Q8_0Matrix;

fn time(mut f: impl FnMut()) -> Duration {
    for _ in 0..3 {
        f();
    }
    let started = Instant::now();
    for _ in 0..20 {
        f();
    }
    started.elapsed() / 20
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: q8_0_head MODEL.gguf")?;
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let weight = content.tensor(&mut file, "token_embd.weight", &Device::Cpu)?;
    if weight.dtype() != GgmlDType::Q8_0 {
        return Err(format!("token_embd.weight is {:?}, not Q8_0", weight.dtype()).into());
    }
    let (n, k) = weight.shape().dims2()?;
    let ours = Q8_0Matrix::from_gguf_bytes(&weight.data()?, n, k)?;
    let candle = QMatMul::from_qtensor(weight)?;
    for m in [1usize, 8] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let t = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?;
        let a = time(|| {
            ours.matmul(&x, m);
        });
        let b = time(|| {
            candle.forward(&t).expect("candle matmul");
        });
        println!(
            "[{n}x{k}] batch {m}: strata {a:?}, candle {b:?} ({:.2}x)",
            b.as_secs_f64() / a.as_secs_f64()
        );
    }
    Ok(())
}
