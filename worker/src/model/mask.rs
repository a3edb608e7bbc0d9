//! Causal masks for prefill steps, reused per `(q_len, kv_len, window)`. Decode steps (one new
//! position) attend to the whole history (or the window's part of it) and need no mask.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

/// At most this many masks are kept; past it the cache starts over (prompts of many different lengths
/// would otherwise grow it without bound).
const MAX_CACHED_MASKS: usize = 64;

/// Additive masks `[q_len, kv_len]`: 0 where query `i` (at position `kv_len - q_len + i`) may attend
/// to key `j`, -inf where `j` is in its future or, with a sliding window `w`, `w` or more positions
/// behind it.
#[derive(Debug)]
pub struct MaskCache {
    masks: HashMap<(usize, usize, Option<usize>), Tensor>,
    reuse: bool,
}

impl MaskCache {
    /// `reuse: false` builds every mask anew (kept only to measure what the cache saves).
    pub fn new(reuse: bool) -> Self {
        Self {
            masks: HashMap::new(),
            reuse,
        }
    }

    pub fn get(
        &mut self,
        q_len: usize,
        kv_len: usize,
        window: Option<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        // A window that reaches past the first key masks nothing the causal mask does not.
        let window = window.filter(|&w| w < kv_len);
        if !self.reuse {
            return build(q_len, kv_len, window, dtype, device);
        }
        if let Some(mask) = self.masks.get(&(q_len, kv_len, window)) {
            return Ok(mask.clone());
        }
        if self.masks.len() >= MAX_CACHED_MASKS {
            self.masks.clear();
        }
        let mask = build(q_len, kv_len, window, dtype, device)?;
        self.masks.insert((q_len, kv_len, window), mask.clone());
        Ok(mask)
    }

    pub fn clear(&mut self) {
        self.masks.clear();
    }
}

fn build(
    q_len: usize,
    kv_len: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let offset = kv_len - q_len;
    let values: Vec<f32> = (0..q_len)
        .flat_map(|i| {
            let pos = offset + i;
            (0..kv_len).map(move |j| {
                let behind = window.is_some_and(|w| j + w <= pos);
                if j > pos || behind {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(values, (q_len, kv_len), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_allows_past_and_present_only() -> Result<()> {
        let mut cache = MaskCache::new(true);
        let m = cache
            .get(2, 4, None, DType::F32, &Device::Cpu)?
            .to_vec2::<f32>()?;
        let inf = f32::NEG_INFINITY;
        assert_eq!(m, vec![vec![0.0, 0.0, 0.0, inf], vec![0.0, 0.0, 0.0, 0.0]]);
        Ok(())
    }

    #[test]
    fn a_window_masks_what_is_too_far_behind() -> Result<()> {
        let mut cache = MaskCache::new(true);
        let inf = f32::NEG_INFINITY;
        // Queries at positions 2 and 3 with a window of 2: each sees itself and one position back.
        let m = cache
            .get(2, 4, Some(2), DType::F32, &Device::Cpu)?
            .to_vec2::<f32>()?;
        assert_eq!(m, vec![vec![inf, 0.0, 0.0, inf], vec![inf, inf, 0.0, 0.0]]);
        // A window as long as the history changes nothing.
        let wide = cache
            .get(2, 4, Some(4), DType::F32, &Device::Cpu)?
            .to_vec2::<f32>()?;
        let causal = cache
            .get(2, 4, None, DType::F32, &Device::Cpu)?
            .to_vec2::<f32>()?;
        assert_eq!(wide, causal);
        Ok(())
    }
}
