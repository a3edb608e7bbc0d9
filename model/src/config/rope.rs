//! Rotary position embeddings: which scaling a model uses and the frequencies it gives.

use super::RopeStyle;

/// How RoPE frequencies are stretched for contexts longer than training (Hugging Face
/// `rope_scaling`, GGUF `rope.scaling.*` and `rope_freqs`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear {
        factor: f32,
    },
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
    /// YaRN: a per-frequency blend of interpolation and extrapolation, and cos/sin scaled by an
    /// attention factor.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
        /// `None`: `0.1 ln(factor) + 1`.
        attention_factor: Option<f32>,
    },
    /// Per-frequency divisors stored in the file (GGUF `rope_freqs.weight`, what llama.cpp's
    /// converter writes for Llama 3.x); the worker reads the tensor.
    FileFactors,
}

/// What rotary embeddings a model uses.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
    /// Sliding-window layers' own base (Gemma 3: 10 000); they take no scaling.
    pub local_theta: Option<f32>,
}

impl RopeConfig {
    /// The base and scaling of one layer, given whether it attends within a window.
    pub fn for_layer(&self, windowed: bool) -> (f32, &RopeScaling) {
        match (windowed, self.local_theta) {
            (true, Some(theta)) => (theta, &RopeScaling::None),
            _ => (self.theta, &self.scaling),
        }
    }
}

/// Inverse frequencies `theta^(-2i/d) / divisor_i` of a head of `head_dim` under `scaling`, and the
/// factor cos and sin are multiplied by (1 but for YaRN). `file_factors` are the divisors of
/// [`RopeScaling::FileFactors`]. Computed in f32, as transformers does.
pub fn rope_inv_freq(
    head_dim: usize,
    theta: f32,
    scaling: &RopeScaling,
    file_factors: Option<&[f32]>,
) -> (Vec<f32>, f32) {
    let base: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
        .collect();
    match scaling {
        RopeScaling::None => (base, 1.0),
        RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
        RopeScaling::FileFactors => {
            let factors = file_factors.unwrap_or(&[]);
            let freq = base
                .iter()
                .enumerate()
                .map(|(i, f)| f / factors.get(i).copied().unwrap_or(1.0))
                .collect();
            (freq, 1.0)
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => {
            let old = *original_context as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let freq = base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (freq, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attention_factor,
        } => {
            let d = head_dim as f32;
            let correction_dim = |rotations: f32| {
                d * (*original_context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
                    / (2.0 * theta.ln())
            };
            let low = correction_dim(*beta_fast).floor().max(0.0);
            let high = correction_dim(*beta_slow).ceil().min(d - 1.0);
            let high = if low == high { high + 0.001 } else { high };
            let freq = base
                .iter()
                .enumerate()
                .map(|(i, &f)| {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    (f / factor) * (1.0 - extrapolation) + f * extrapolation
                })
                .collect();
            let mscale = attention_factor.unwrap_or(if *factor <= 1.0 {
                1.0
            } else {
                0.1 * factor.ln() + 1.0
            });
            (freq, mscale)
        }
    }
}
