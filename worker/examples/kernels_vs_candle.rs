//! Times strata's CPU kernel against candle's quantized matmul on one tensor of each quantized type
//! in a GGUF file (the first of each; the output head where it is one), at batch 1, 8 and 128:
//! `cargo run --release -p strata-worker --example kernels_vs_candle -- MODEL.gguf`
//! (`RAYON_NUM_THREADS` sets the threads).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{Device, Module, Tensor};
use strata_worker::model::cpu_kernels;

fn time(mut f: impl FnMut()) -> Duration {
    for _ in 0..3 {
        f();
    }
    let started = Instant::now();
    for _ in 0..10 {
        f();
    }
    started.elapsed() / 10
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: kernels_vs_candle MODEL.gguf")?;
    if !cpu_kernels::supported() {
        return Err("this CPU lacks AVX2/FMA/F16C: strata's kernels do not run here".into());
    }
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    // The first tensor of each type, the output head first (it is the widest).
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| (!n.starts_with("output"), !n.starts_with("token_embd"), *n));
    let mut picked = BTreeMap::new();
    for name in names {
        let info = &content.tensor_infos[name];
        if info.shape.dims().len() == 2 && cpu_kernels::KERNEL_TYPES.contains(&info.ggml_dtype) {
            picked
                .entry(format!("{:?}", info.ggml_dtype))
                .or_insert(name.clone());
        }
    }
    for (dtype, name) in picked {
        let weight = content.tensor(&mut file, &name, &Device::Cpu)?;
        let (n, k) = weight.shape().dims2()?;
        let isa = cpu_kernels::Isa::detect().ok_or("this CPU runs no strata kernel")?;
        let ours = cpu_kernels::matrix_for(weight.dtype(), &weight.data()?, n, k, isa)
            .ok_or("no strata kernel")??;
        let candle = QMatMul::from_qtensor(weight)?;
        for m in [1usize, 8, 128] {
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
                "{dtype} {name} [{n}x{k}] batch {m}: strata {a:?}, candle {b:?} ({:.2}x)",
                b.as_secs_f64() / a.as_secs_f64()
            );
        }
    }
    Ok(())
}
