//! Every kernel against an exact oracle: candle's own dequantization of the weights as stored (an
//! independent reading of the GGUF block layouts: scales, minimums, bits) times the activations as
//! strata quantized them, summed in f64, within f32 accumulation error, for every format, both
//! instruction-set levels, one and several rows, odd shapes.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use half::f16;

use super::activations::{ActivationBlock, BlockQ8K, BlockQ8_1};
use super::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
}

/// Byte offsets of each block's f16 scales, and whether a scale is a (negated) minimum: random bytes
/// elsewhere are valid quantized values, random bytes there would be NaNs and infinities.
fn scale_fields(dtype: GgmlDType) -> &'static [(usize, bool)] {
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => &[(0, false)],
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => &[(0, false), (2, true)],
        // d, then dmin (subtracted by the format itself, so positive).
        GgmlDType::Q4K | GgmlDType::Q5K => &[(0, false), (2, false)],
        GgmlDType::Q6K => &[(208, false)],
        other => panic!("no kernel for {other:?}"),
    }
}

/// A random `[n, k]` tensor of `dtype` as GGUF bytes, and candle's dequantization of it.
fn random_tensor(dtype: GgmlDType, n: usize, k: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (size, elems) = (dtype.type_size(), dtype.block_size());
    let mut bytes: Vec<u8> = (0..n * k / elems * size)
        .map(|_| rng.next() as u8)
        .collect();
    for block in bytes.chunks_exact_mut(size) {
        for &(offset, negative) in scale_fields(dtype) {
            let magnitude = 0.002 + 0.02 * (rng.next() % 1000) as f32 / 1000.0;
            let value = if negative { -magnitude } else { magnitude };
            block[offset..offset + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
        }
    }
    let q = qtensor_from_ggml(dtype, &bytes, vec![n, k], &Device::Cpu).unwrap();
    let dense = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
    (bytes, dense.to_vec1::<f32>().unwrap())
}

/// The activations the kernel actually multiplies: `x` quantized as the format's kernel does.
fn quantized_activations(dtype: GgmlDType, x: &[f32]) -> Vec<f32> {
    let elems = dtype.block_size();
    x.chunks_exact(elems)
        .flat_map(|chunk| {
            if elems == activations::QK_K {
                BlockQ8K::quantize(chunk).dequantize()
            } else {
                BlockQ8_1::quantize(chunk).dequantize()
            }
        })
        .collect()
}

fn check(dtype: GgmlDType, n: usize, k: usize, m: usize, seed: u64) {
    let mut rng = Rng(seed);
    let (bytes, dense) = random_tensor(dtype, n, k, &mut rng);
    let best = Isa::detect().expect("a CPU with strata's kernels");
    let matrix = matrix_for(dtype, &bytes, n, k, best)
        .expect("a kernel on this CPU")
        .unwrap();
    assert_eq!((matrix.rows(), matrix.bytes()), (n, bytes.len()));
    let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
    let got = matrix.matmul(&x, m);
    let xq = quantized_activations(dtype, &x);
    for row in 0..m {
        for col in 0..n {
            let (w, a) = (&dense[col * k..(col + 1) * k], &xq[row * k..(row + 1) * k]);
            let exact: f64 = w.iter().zip(a).map(|(w, a)| *w as f64 * *a as f64).sum();
            let scale: f64 = w
                .iter()
                .zip(a)
                .map(|(w, a)| (*w as f64 * *a as f64).abs())
                .sum();
            // Only f32 rounding separates the kernel from the exact product of the same quantized
            // values (1e-6 of the products' magnitudes: f32 accumulation over a few hundred
            // blocks): a misread scale, minimum, bit or sum term moves whole blocks, far beyond it.
            let err = (got[row * n + col] as f64 - exact).abs();
            assert!(
                err <= 1e-6 * scale + 1e-9,
                "{dtype:?} [{n}, {k}] × {m} rows: [{row},{col}] {} vs {exact} (scale {scale})",
                got[row * n + col]
            );
            // And the activation quantization stays within llama.cpp's ~1% of the f32 product.
            let f32_product: f64 = w
                .iter()
                .zip(&x[row * k..])
                .map(|(w, a)| *w as f64 * *a as f64)
                .sum();
            assert!((got[row * n + col] as f64 - f32_product).abs() <= 0.02 * scale + 1e-4);
        }
    }
    // Every instruction set gives exactly the same results (the same integer sums), asked for per
    // call or chosen at load.
    for isa in Isa::available() {
        assert_eq!(matrix.matmul_with(&x, m, isa), got, "{dtype:?} on {isa:?}");
        let at_load = matrix_for(dtype, &bytes, n, k, isa).unwrap().unwrap();
        assert_eq!(at_load.isa(), isa);
        assert_eq!(at_load.matmul(&x, m), got, "{dtype:?} loaded for {isa:?}");
    }
    // Each row alone gives bit-identical results to the row inside the batch.
    for row in [0, m - 1] {
        let alone = matrix.matmul(&x[row * k..(row + 1) * k], 1);
        assert_eq!(alone, got[row * n..(row + 1) * n], "{dtype:?} row {row}");
    }
}

#[test]
fn every_kernel_matches_the_dequantized_product_on_odd_shapes() {
    if !supported() {
        eprintln!("skipped: this CPU has no AVX2/FMA, candle's kernels run instead");
        return;
    }
    for (i, &dtype) in KERNEL_TYPES.iter().enumerate() {
        let kb = if dtype.block_size() == 256 { 256 } else { 32 };
        // One column and one row; rows that are not a multiple of the tile; columns that are not a
        // multiple of the pool's tasks; several tiles of a wide input.
        for (j, (n, blocks, m)) in [(1, 1, 1), (70, 3, 7), (33, 2, 9), (129, 5, 4)]
            .into_iter()
            .enumerate()
        {
            check(dtype, n, blocks * kb, m, (i * 10 + j) as u64);
        }
    }
}

#[test]
fn rejects_wrong_sizes() {
    for &dtype in KERNEL_TYPES {
        let (size, elems) = (dtype.type_size(), dtype.block_size());
        if supported() {
            // Rows that are not whole blocks, and bytes that are not the tensor's.
            assert!(
                matrix_for(dtype, &vec![0; 2 * size], 1, elems + 1, Isa::Avx2)
                    .unwrap()
                    .is_err()
            );
            assert!(matrix_for(dtype, &vec![0; size - 1], 1, elems, Isa::Avx2)
                .unwrap()
                .is_err());
        }
    }
    assert!(matrix_for(GgmlDType::Q2K, &[0; 84], 1, 256, Isa::Avx2).is_none());
}
