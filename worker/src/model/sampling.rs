//! Choosing the next token from a row of logits, on the last stage.
//!
//! Sampling is a pure function of (logits, parameters, the tokens so far, position): the random
//! draw for the token at position `p` comes from a generator seeded with `(seed, p)`. A sequence
//! therefore gets the same tokens alone or in any batch, and a replay after a worker loss
//! reproduces them.

use std::borrow::Cow;

use candle_core::{Result, Tensor};

/// How to pick a token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the most likely tokens up to this cumulative probability; 0 or ≥ 1 keeps all.
    pub top_p: f32,
    /// Keep tokens at least this fraction as likely as the most likely one; 0 keeps all.
    pub min_p: f32,
    pub seed: u64,
    pub penalties: Penalties,
    /// Added to these tokens' logits.
    pub logit_bias: Vec<(u32, f32)>,
}

/// Penalties on tokens already seen (`TokenCount`s: each distinct token of the prompt and the
/// output, and how often it was generated).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Penalties {
    /// Subtracted once from every generated token's logit.
    pub presence: f32,
    /// Subtracted per time a token was generated.
    pub frequency: f32,
    /// Divides positive and multiplies negative logits of every seen token; 1 is none.
    pub repetition: f32,
}

impl Penalties {
    pub const NONE: Self = Self {
        presence: 0.0,
        frequency: 0.0,
        repetition: 1.0,
    };

    fn any(&self) -> bool {
        *self != Self::NONE
    }
}

impl SamplingParams {
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: 0,
        penalties: Penalties::NONE,
        logit_bias: Vec::new(),
    };

    /// Greedy on the raw logits, so the choice can be made where the logits are.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0 && !self.penalties.any() && self.logit_bias.is_empty()
    }
}

/// The chosen token, its log-probability and the most likely alternatives (log-softmax of the raw
/// logits, before penalties, bias, temperature and truncation).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Picks the token at `position` from `logits`, reporting the `top_n` most likely tokens. `seen`
/// lists the tokens so far as `(id, times generated)`, once each; only penalties read it.
/// `allowed`, unless empty, is a grammar's bitmask (bit `i % 32` of word `i / 32` for token `i`):
/// the choice is among those tokens only.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    seen: &[(u32, u32)],
    allowed: &[u32],
    position: u64,
    top_n: usize,
) -> Sampled {
    let max = max_of(logits);
    let log_norm = max as f64 + sum_exp_below(logits, max).ln();
    let logprob = |id: usize| (logits[id] as f64 - log_norm) as f32;

    let choose_from = adjusted(logits, params, seen, allowed);
    let id = if params.temperature <= 0.0 {
        // The raw row's maximum serves unless penalties or bias rewrote the row.
        let choice_max = match &choose_from {
            Cow::Borrowed(_) => max,
            Cow::Owned(row) => max_of(row),
        };
        argmax(&choose_from, choice_max)
    } else {
        draw(&choose_from, params, position)
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

/// The logits the choice is made from: the raw ones with the penalties and biases applied (in
/// that order, as vLLM does), and tokens outside `allowed` (if given) at `-inf`. Ids outside the
/// row are ignored: validation refuses them earlier.
fn adjusted<'a>(
    logits: &'a [f32],
    params: &SamplingParams,
    seen: &[(u32, u32)],
    allowed: &[u32],
) -> Cow<'a, [f32]> {
    let p = params.penalties;
    if !p.any() && params.logit_bias.is_empty() && allowed.is_empty() {
        return Cow::Borrowed(logits);
    }
    let mut out = logits.to_vec();
    if !allowed.is_empty() {
        for (word, chunk) in allowed.iter().zip(out.chunks_mut(32)) {
            for (bit, l) in chunk.iter_mut().enumerate() {
                if word >> bit & 1 == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        // Ids past the mask's words are not allowed either.
        for l in out.iter_mut().skip(allowed.len() * 32) {
            *l = f32::NEG_INFINITY;
        }
    }
    if p.any() {
        for &(id, generated) in seen {
            let Some(l) = out.get_mut(id as usize) else {
                continue;
            };
            if p.repetition != 1.0 {
                *l = if *l > 0.0 {
                    *l / p.repetition
                } else {
                    *l * p.repetition
                };
            }
            if generated > 0 {
                *l -= p.presence + p.frequency * generated as f32;
            }
        }
    }
    for &(id, bias) in &params.logit_bias {
        if let Some(l) = out.get_mut(id as usize) {
            *l += bias;
        }
    }
    Cow::Owned(out)
}

/// Greedy choice per row of `logits: [rows, vocab]` where they are (on the device, for GPU stages): the lowest index holding the row's largest logit, and its
/// log-probability `-ln Σ exp(x - max)`. `fused`: one kernel on CUDA (`fused_ops::greedy_rows`).
pub fn greedy_rows(logits: &Tensor, fused: bool) -> Result<(Vec<u32>, Vec<f32>)> {
    #[cfg(feature = "cuda")]
    if fused && logits.device().is_cuda() && logits.dtype() == candle_core::DType::F32 {
        return super::fused_ops::greedy_rows(logits);
    }
    let _ = fused;
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

/// Lanes the row reductions below keep side by side: written so the compiler turns them into
/// vector instructions (AVX2 here, NEON on Apple silicon). The scalar `f32::exp` and `f32::max`
/// folds they replace took ~0.5 ms per 49152-wide row, 8% of a 4-sequence step of a CPU last stage.
const LANES: usize = 8;

/// The largest value (NaN is skipped; `-inf` for an empty or all-NaN row).
fn max_of(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    tail.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `Σ exp(x - max)` over the row, with `max` its largest value: exponentials in f32 (error ~1e-7
/// relative each), summed per lane in f32 over blocks short enough that the rounding stays below
/// 1e-6, blocks added in f64.
fn sum_exp_below(xs: &[f32], max: f32) -> f64 {
    const BLOCK: usize = 256;
    let mut exps = [0f32; BLOCK];
    let mut total = 0f64;
    for block in xs.chunks(BLOCK) {
        // An element-wise map the compiler vectorizes whole, then a lane-wise sum.
        let exps = &mut exps[..block.len()];
        for (e, &x) in exps.iter_mut().zip(block) {
            *e = exp_nonpositive(x - max);
        }
        let mut lanes = [0f32; LANES];
        let chunks = exps.chunks_exact(LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (acc, &e) in lanes.iter_mut().zip(chunk) {
                *acc += e;
            }
        }
        total += lanes.iter().chain(tail).map(|&v| v as f64).sum::<f64>();
    }
    total
}

/// `exp(x)` for `x ≤ 0` without branches (so it vectorizes): `x = n ln2 + r` with `|r| ≤ ln2/2`,
/// `exp(r)` by its degree-7 Taylor polynomial (truncation error < 6e-9 relative), scaled by `2^n`
/// through the exponent bits. Arguments below -87 (including -inf) give ~1e-38 instead of 0, which
/// no sum of at least one `exp(0) = 1` can notice; NaN gives the same.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds to an integer held in the low mantissa bits (no float→int
    // conversion, which kept the loop scalar).
    const ROUND: f32 = 12_582_912.0;
    let x = if x > -87.0 { x } else { -87.0 };
    let x = if x < 0.0 { x } else { 0.0 };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n: n (≥ -126) as an exponent field.
    let exponent = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(exponent)
}

/// The index of the largest logit, `max` (from [`max_of`]); the lowest index among equals (NaN never
/// wins; 0 for a row without numbers). Blocks are tested whole for the maximum (vectorized) and only
/// the block holding it is searched.
fn argmax(logits: &[f32], max: f32) -> usize {
    const BLOCK: usize = 64;
    for (b, block) in logits.chunks(BLOCK).enumerate() {
        if block.iter().fold(false, |hit, &x| hit | (x == max)) {
            let i = block
                .iter()
                .position(|&x| x == max)
                .expect("the block holds it");
            return b * BLOCK + i;
        }
    }
    0
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
    if params.min_p > 0.0 {
        // Weights are relative to the most likely token's (1), and fall along `candidates`.
        let floor = params.min_p as f64;
        keep = keep.min(weights.iter().take_while(|&&w| w >= floor).count().max(1));
    }
    // Tokens a grammar rules out weigh 0 and come last: never drawn, even at the rounding edge.
    keep = keep.min(weights.iter().take_while(|&&w| w > 0.0).count().max(1));
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
    fn a_grammar_mask_leaves_only_its_tokens() {
        // Token 0 is by far the most likely; the mask allows 2 and 33 (of 40) only.
        let mut row = vec![0.0f32; 40];
        row[0] = 9.0;
        row[2] = 1.0;
        row[33] = 2.0;
        let mask = [1u32 << 2, 1u32 << 1];
        let greedy = sample(&row, &SamplingParams::GREEDY, &[], &mask, 0, 1);
        assert_eq!(greedy.id, 33);
        // Log-probabilities stay the raw row's: token 0 is still the top alternative.
        assert_eq!(greedy.top[0].0, 0);
        let hot = SamplingParams {
            temperature: 5.0,
            top_k: 10,
            seed: 3,
            ..SamplingParams::GREEDY
        };
        let drawn: std::collections::BTreeSet<u32> = (0..300)
            .map(|pos| sample(&row, &hot, &[], &mask, pos, 0).id)
            .collect();
        assert_eq!(drawn, [2, 33].into());
        // A mask shorter than the row allows nothing past its words.
        assert_eq!(
            sample(&row, &SamplingParams::GREEDY, &[], &[1 << 2], 0, 0).id,
            2
        );
    }

    #[test]
    fn greedy_takes_argmax_and_reports_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let s = sample(&logits, &SamplingParams::GREEDY, &[], &[], 0, 3);
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
            ..SamplingParams::GREEDY
        };
        let a: Vec<u32> = (0..50)
            .map(|pos| sample(&logits, &p, &[], &[], pos, 0).id)
            .collect();
        let b: Vec<u32> = (0..50)
            .map(|pos| sample(&logits, &p, &[], &[], pos, 0).id)
            .collect();
        assert_eq!(a, b);
        let other = SamplingParams {
            seed: 43,
            ..p.clone()
        };
        let c: Vec<u32> = (0..50)
            .map(|pos| sample(&logits, &other, &[], &[], pos, 0).id)
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
            ..SamplingParams::GREEDY
        };
        assert!((0..100).all(|pos| sample(&logits, &k1, &[], &[], pos, 0).id == 0));
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 1,
            ..SamplingParams::GREEDY
        };
        assert!((0..100).all(|pos| sample(&logits, &p, &[], &[], pos, 0).id == 0));
        let p2 = SamplingParams {
            top_p: 0.9,
            ..p.clone()
        };
        let ids: std::collections::BTreeSet<u32> = (0..200)
            .map(|pos| sample(&logits, &p2, &[], &[], pos, 0).id)
            .collect();
        assert_eq!(ids, [0, 1].into_iter().collect());
    }

    /// Greedy with `penalties` over a row where token 0 leads token 1 by 0.5 and token 2 is
    /// negative: which token wins, and the log-probability reported for it.
    fn greedy_with(penalties: Penalties, seen: &[(u32, u32)]) -> Sampled {
        let params = SamplingParams {
            penalties,
            ..SamplingParams::GREEDY
        };
        sample(&[2.0, 1.5, -1.0, 0.0], &params, seen, &[], 0, 0)
    }

    #[test]
    fn presence_penalty_is_once_per_generated_token() {
        let none = Penalties::NONE;
        let p = |presence| Penalties { presence, ..none };
        // Generated once or five times: the same 0.6 off token 0's 2.0, below token 1's 1.5.
        assert_eq!(greedy_with(p(0.6), &[(0, 1)]).id, 1);
        assert_eq!(greedy_with(p(0.6), &[(0, 5)]).id, 1);
        // 0.4 is not enough; a prompt-only token (0 generated) is not penalized.
        assert_eq!(greedy_with(p(0.4), &[(0, 9)]).id, 0);
        assert_eq!(greedy_with(p(2.0), &[(0, 0)]).id, 0);
        // A negative penalty favors a token already generated.
        assert_eq!(greedy_with(p(-0.6), &[(1, 1)]).id, 1);
        // The log-probability is of the raw logits.
        let raw = greedy_with(none, &[]);
        let penalized = greedy_with(p(0.6), &[(0, 1)]);
        assert!((penalized.logprob - (raw.logprob - 0.5)).abs() < 1e-6);
    }

    #[test]
    fn frequency_penalty_grows_with_the_count() {
        let f = |frequency| Penalties {
            frequency,
            ..Penalties::NONE
        };
        // 0.2 per time: 2 times is 0.4 (token 0 stays ahead), 3 times is 0.6 (it falls behind).
        assert_eq!(greedy_with(f(0.2), &[(0, 2)]).id, 0);
        assert_eq!(greedy_with(f(0.2), &[(0, 3)]).id, 1);
        assert_eq!(greedy_with(f(0.2), &[(0, 0)]).id, 0);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let r = |repetition| Penalties {
            repetition,
            ..Penalties::NONE
        };
        // 2.0 / 1.5 = 1.33 < 1.5: a prompt token counts too (0 generated).
        assert_eq!(greedy_with(r(1.5), &[(0, 0)]).id, 1);
        assert_eq!(greedy_with(r(1.2), &[(0, 0)]).id, 0);
        // Negative logits move away from zero: a penalized token 2 (-0.5 → -1.0) falls behind
        // token 3 (-0.75).
        let params = SamplingParams {
            penalties: r(2.0),
            ..SamplingParams::GREEDY
        };
        let row = [-1.0f32, -5.0, -0.5, -0.75];
        assert_eq!(sample(&row, &params, &[], &[], 0, 0).id, 2);
        assert_eq!(sample(&row, &params, &[(2, 1)], &[], 0, 0).id, 3);
        // Below 1, it rewards repeats.
        assert_eq!(greedy_with(r(0.5), &[(1, 1)]).id, 1);
    }

    #[test]
    fn logit_bias_adds_to_the_named_tokens() {
        let row = [2.0f32, 1.5, -1.0, 0.0];
        let bias = |logit_bias| SamplingParams {
            logit_bias,
            ..SamplingParams::GREEDY
        };
        assert_eq!(sample(&row, &bias(vec![(3, 2.5)]), &[], &[], 0, 0).id, 3);
        assert_eq!(sample(&row, &bias(vec![(3, 1.5)]), &[], &[], 0, 0).id, 0);
        // -100 bans a token, also when sampling at a high temperature.
        let banned = SamplingParams {
            temperature: 5.0,
            seed: 3,
            ..bias(vec![(0, -100.0), (1, -100.0)])
        };
        assert!((0..200).all(|pos| sample(&row, &banned, &[], &[], pos, 0).id >= 2));
        // Ids past the row are ignored rather than trusted.
        assert_eq!(sample(&row, &bias(vec![(99, 50.0)]), &[], &[], 0, 0).id, 0);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        // Probabilities ∝ e^0, e^-1, e^-3, e^-4: 1, 0.37, 0.05, 0.02 of the best.
        let row = [0.0f32, -1.0, -3.0, -4.0];
        let params = |min_p| SamplingParams {
            temperature: 1.0,
            min_p,
            seed: 11,
            ..SamplingParams::GREEDY
        };
        let drawn = |min_p| -> std::collections::BTreeSet<u32> {
            (0..2000)
                .map(|pos| sample(&row, &params(min_p), &[], &[], pos, 0).id)
                .collect()
        };
        assert_eq!(drawn(0.0), [0, 1, 2, 3].into_iter().collect());
        assert_eq!(drawn(0.1), [0, 1].into_iter().collect());
        assert_eq!(drawn(0.5), [0].into_iter().collect());
    }

    #[test]
    fn no_penalty_leaves_the_row_alone() {
        let row = [2.0f32, 1.5];
        assert!(matches!(
            adjusted(&row, &SamplingParams::GREEDY, &[(0, 3)], &[]),
            Cow::Borrowed(_)
        ));
        assert!(SamplingParams::GREEDY.is_plain_greedy());
        let rep = SamplingParams {
            penalties: Penalties {
                repetition: 1.1,
                ..Penalties::NONE
            },
            ..SamplingParams::GREEDY
        };
        assert!(!rep.is_plain_greedy());
    }

    #[test]
    fn vector_exp_and_max_match_the_scalar_ones() {
        for i in 0..=20_000 {
            let x = -(i as f32) * 0.005; // 0 down to -100
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            if x > -87.0 {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert!(got < 1e-37, "exp({x}) = {got}");
            }
        }
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        // A 49152-wide row (SmolLM2's vocabulary) with a tail that is not a whole number of lanes.
        let row: Vec<f32> = (0..49_157)
            .map(|i| ((i * 7919 % 10_007) as f32 / 10_007.0 - 0.5) * 30.0)
            .collect();
        let scalar_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max_of(&row), scalar_max);
        let want: f64 = row.iter().map(|&l| ((l - scalar_max) as f64).exp()).sum();
        let got = sum_exp_below(&row, scalar_max);
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
        assert_eq!(max_of(&[f32::NAN, -1.0, f32::NAN]), -1.0);
        assert_eq!(max_of(&[]), f32::NEG_INFINITY);
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
        let (ids, logprobs) = greedy_rows(&logits, true).unwrap();
        for (i, row) in rows.iter().enumerate() {
            let host = sample(row, &SamplingParams::GREEDY, &[], &[], 7, 0);
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
