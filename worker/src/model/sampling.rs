//! Choosing the next token from a row of logits, on the last stage.
//!
//! Sampling is a pure function of (logits, parameters, position): the random draw for the token at
//! position `p` comes from a generator seeded with `(seed, p)`. A sequence therefore gets the same
//! tokens alone or in any batch, and a replay after a worker loss reproduces them.

use candle_core::{Result, Tensor};

/// How to pick a token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the most likely tokens up to this cumulative probability; 0 or ≥ 1 keeps all.
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingParams {
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
}

/// The chosen token, its log-probability and the most likely alternatives (log-softmax of the raw
/// logits, before temperature and truncation).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Picks the token at `position` from `logits`, reporting the `top_n` most likely tokens.
pub fn sample(logits: &[f32], params: &SamplingParams, position: u64, top_n: usize) -> Sampled {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // exp in f32 (a third of f64's cost over a 32000–49152-wide row, where it dominated sampling),
    // summed in f64: the normalizer stays accurate to ~1e-7.
    let log_norm = max as f64
        + logits
            .iter()
            .map(|&l| (l - max).exp() as f64)
            .sum::<f64>()
            .ln();
    let logprob = |id: usize| (logits[id] as f64 - log_norm) as f32;

    let id = if params.temperature <= 0.0 {
        argmax(logits)
    } else {
        draw(logits, params, position)
    };
    let top = top_indices(logits, top_n)
        .into_iter()
        .map(|i| (i as u32, logprob(i)))
        .collect();
    Sampled {
        id: id as u32,
        logprob: logprob(id),
        top,
    }
}

/// Greedy choice per row of `logits: [rows, vocab]` where they are (on the device, for GPU stages): the lowest index holding the row's largest logit, and its
/// log-probability `-ln Σ exp(x - max)`.
pub fn greedy_rows(logits: &Tensor) -> Result<(Vec<u32>, Vec<f32>)> {
    let (rows, vocab) = logits.dims2()?;
    let max = logits.max_keepdim(1)?;
    let logprob = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(1)?
        .log()?
        .neg()?;
    let index = Tensor::arange(0u32, vocab as u32, logits.device())?
        .reshape((1, vocab))?
        .broadcast_as((rows, vocab))?;
    // A broadcast scalar: no rows × vocab buffer to fill every step.
    let none = Tensor::new(u32::MAX, logits.device())?.broadcast_as((rows, vocab))?;
    let ids = logits
        .broadcast_eq(&max)?
        .where_cond(&index, &none)?
        .min_keepdim(1)?;
    Ok((
        ids.flatten_all()?.to_vec1::<u32>()?,
        logprob.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// The index of the largest logit; the lowest index among equals (NaN never wins).
fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best
}

/// The `n` largest logits' indices, largest first, ties by lower index.
fn top_indices(logits: &[f32], n: usize) -> Vec<usize> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, order);
        idx.truncate(n);
    }
    idx.sort_by(order);
    idx
}

fn draw(logits: &[f32], params: &SamplingParams, position: u64) -> usize {
    let k = if params.top_k == 0 {
        logits.len()
    } else {
        params.top_k.min(logits.len())
    };
    let candidates = top_indices(logits, k);
    let t = params.temperature as f64;
    let max = logits[candidates[0]] as f64;
    let weights: Vec<f64> = candidates
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut keep = weights.len();
    if params.top_p > 0.0 && params.top_p < 1.0 {
        let mut cumulative = 0.0;
        for (n, w) in weights.iter().enumerate() {
            cumulative += w / total;
            if cumulative >= params.top_p as f64 {
                keep = n + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let mut target = uniform(params.seed, position) * kept_total;
    for (n, w) in weights[..keep].iter().enumerate() {
        if target < *w {
            return candidates[n];
        }
        target -= w;
    }
    candidates[keep - 1]
}

/// A uniform draw in [0, 1) from (seed, position), by SplitMix64.
fn uniform(seed: u64, position: u64) -> f64 {
    let mut z = seed ^ position.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for _ in 0..2 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_reports_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let s = sample(&logits, &SamplingParams::GREEDY, 0, 3);
        assert_eq!(s.id, 1, "ties go to the lower id");
        let norm: f64 = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        assert!((s.logprob as f64 - (3.0 - norm)).abs() < 1e-6);
        let ids: Vec<u32> = s.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
    }

    #[test]
    fn sampling_is_a_function_of_seed_and_position() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 42,
        };
        let a: Vec<u32> = (0..50).map(|pos| sample(&logits, &p, pos, 0).id).collect();
        let b: Vec<u32> = (0..50).map(|pos| sample(&logits, &p, pos, 0).id).collect();
        assert_eq!(a, b);
        let other = SamplingParams { seed: 43, ..p };
        let c: Vec<u32> = (0..50)
            .map(|pos| sample(&logits, &other, pos, 0).id)
            .collect();
        assert_ne!(a, c);
        let distinct: std::collections::BTreeSet<u32> = a.iter().copied().collect();
        assert!(distinct.len() > 5, "draws should vary: {distinct:?}");
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let logits = [5.0f32, 4.0, 0.0, -1.0, -2.0];
        let k1 = SamplingParams {
            temperature: 2.0,
            top_k: 1,
            top_p: 1.0,
            seed: 1,
        };
        assert!((0..100).all(|pos| sample(&logits, &k1, pos, 0).id == 0));
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 1,
        };
        assert!((0..100).all(|pos| sample(&logits, &p, pos, 0).id == 0));
        let p2 = SamplingParams { top_p: 0.9, ..p };
        let ids: std::collections::BTreeSet<u32> = (0..200)
            .map(|pos| sample(&logits, &p2, pos, 0).id)
            .collect();
        assert_eq!(ids, [0, 1].into_iter().collect());
    }

    #[test]
    fn uniform_is_in_range() {
        for pos in 0..1000 {
            let u = uniform(7, pos);
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn greedy_rows_match_the_host_sampler_including_ties() {
        let rows: Vec<Vec<f32>> = vec![
            vec![0.5, 2.0, -1.0, 2.0, 1.5],
            vec![-3.0, -2.5, -2.5, -4.0, -2.6],
            vec![10.0, 0.0, 0.0, 0.0, 9.99],
        ];
        let flat: Vec<f32> = rows.concat();
        let logits = Tensor::from_vec(flat, (3, 5), &candle_core::Device::Cpu).unwrap();
        let (ids, logprobs) = greedy_rows(&logits).unwrap();
        for (i, row) in rows.iter().enumerate() {
            let host = sample(row, &SamplingParams::GREEDY, 7, 0);
            assert_eq!(ids[i], host.id, "row {i}");
            assert!(
                (logprobs[i] - host.logprob).abs() < 1e-5,
                "row {i}: {} vs {}",
                logprobs[i],
                host.logprob
            );
        }
    }
}
