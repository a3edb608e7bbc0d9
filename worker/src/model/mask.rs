//! Causal masks for prefill steps, reused per `(q_len, kv_len)`. Decode steps (one new position)
//! attend to the whole history and need no mask.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

/// At most this many masks are kept; past it the cache starts over (prompts of many different lengths
/// would otherwise grow it without bound).
const MAX_CACHED_MASKS: usize = 64;

/// Additive masks `[q_len, kv_len]`: 0 where query `i` (at position `kv_len - q_len + i`) may attend
/// to key `j`, -inf where `j` is in its future.
#[derive(Debug)]
pub struct MaskCache {
    masks: HashMap<(usize, usize), Tensor>,
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
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if !self.reuse {
            return build(q_len, kv_len, dtype, device);
        }
        if let Some(mask) = self.masks.get(&(q_len, kv_len)) {
            return Ok(mask.clone());
        }
        if self.masks.len() >= MAX_CACHED_MASKS {
            self.masks.clear();
        }
        let mask = build(q_len, kv_len, dtype, device)?;
        self.masks.insert((q_len, kv_len), mask.clone());
        Ok(mask)
    }

    pub fn clear(&mut self) {
        self.masks.clear();
    }
}

fn build(q_len: usize, kv_len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let offset = kv_len - q_len;
    let values: Vec<f32> = (0..q_len)
        .flat_map(|i| {
            (0..kv_len).map(move |j| {
                if j > offset + i {
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
            .get(2, 4, DType::F32, &Device::Cpu)?
            .to_vec2::<f32>()?;
        let inf = f32::NEG_INFINITY;
        assert_eq!(m, vec![vec![0.0, 0.0, 0.0, inf], vec![0.0, 0.0, 0.0, 0.0]]);
        Ok(())
    }
}
