//! Per-sequence key/value caches that grow by doubling, so a decode step appends in place instead of
//! copying the whole history (`Tensor::cat` per step would be quadratic in the sequence length).

use candle_core::{DType, Device, Result, Tensor};

use super::kv_pool::PageList;

/// Keys and values of one layer for one sequence, `[kv_heads, capacity, head_dim]`.
#[derive(Debug)]
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    fn with_capacity(shape: (usize, usize, usize), dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            k: Tensor::zeros(shape, dtype, device)?,
            v: Tensor::zeros(shape, dtype, device)?,
            len: 0,
        })
    }

    fn capacity(&self) -> usize {
        self.k.dims()[1]
    }

    /// Appends `k, v: [kv_heads, n, head_dim]` (contiguous) and returns views of the whole history.
    pub fn append(&mut self, k: &Tensor, v: &Tensor, max_len: usize) -> Result<(Tensor, Tensor)> {
        let n = k.dims()[1];
        let needed = self.len + n;
        if needed > self.capacity() {
            let (heads, _, head_dim) = self.k.dims3()?;
            let capacity = (self.capacity() * 2).max(needed).min(max_len.max(needed));
            let mut grown =
                Self::with_capacity((heads, capacity, head_dim), k.dtype(), k.device())?;
            if self.len > 0 {
                grown
                    .k
                    .slice_set(&self.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                grown
                    .v
                    .slice_set(&self.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            grown.len = self.len;
            *self = grown;
        }
        self.k.slice_set(k, 1, self.len)?;
        self.v.slice_set(v, 1, self.len)?;
        self.len = needed;
        Ok((
            self.k.narrow(1, 0, self.len)?,
            self.v.narrow(1, 0, self.len)?,
        ))
    }
}

/// Where a sequence's keys and values live.
#[derive(Debug)]
enum Store {
    /// Its own growing tensors per layer (CPU stages).
    Contiguous(Vec<LayerKv>),
    /// Pages of the stage's shared pool (accelerators; see `kv_pool.rs`).
    Paged(PageList),
}

/// Everything one sequence holds on a stage: its keys and values for every layer, and its length.
#[derive(Debug)]
pub struct SequenceKv {
    store: Store,
    len: usize,
}

impl SequenceKv {
    /// Empty per-sequence caches for `num_layers` layers, with room for `initial` positions.
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        initial: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (kv_heads, initial.max(16), head_dim);
        let layers = (0..num_layers)
            .map(|_| LayerKv::with_capacity(shape, dtype, device))
            .collect::<Result<_>>()?;
        Ok(Self {
            store: Store::Contiguous(layers),
            len: 0,
        })
    }

    /// An empty sequence whose keys and values go to pages of a shared pool.
    pub fn paged(pages: PageList) -> Self {
        Self::paged_holding(pages, 0)
    }

    /// A paged sequence whose first `len` positions are already written to `pages`.
    pub fn paged_holding(pages: PageList, len: usize) -> Self {
        Self {
            store: Store::Paged(pages),
            len,
        }
    }

    /// A contiguous copy of this sequence's first `len` positions (at most its length), with room
    /// for `extra` more.
    pub fn copy_prefix(&self, len: usize, extra: usize) -> Result<Self> {
        let Store::Contiguous(layers) = &self.store else {
            candle_core::bail!("copy_prefix of a paged sequence: the pool copies its pages");
        };
        let len = len.min(self.len);
        let layers = layers
            .iter()
            .map(|layer| {
                let (heads, _, head_dim) = layer.k.dims3()?;
                let shape = (heads, (len + extra).max(1), head_dim);
                let mut copy = LayerKv::with_capacity(shape, layer.k.dtype(), layer.k.device())?;
                if len > 0 {
                    copy.k
                        .slice_set(&layer.k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                    copy.v
                        .slice_set(&layer.v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
                copy.len = len;
                Ok(copy)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            store: Store::Contiguous(layers),
            len,
        })
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache of the stage's `i`-th layer; `None` for a paged sequence.
    pub fn layer(&mut self, i: usize) -> Option<&mut LayerKv> {
        match &mut self.store {
            Store::Contiguous(layers) => Some(&mut layers[i]),
            Store::Paged(_) => None,
        }
    }

    /// The pages of a paged sequence.
    pub fn pages(&self) -> Option<&PageList> {
        match &self.store {
            Store::Paged(pages) => Some(pages),
            Store::Contiguous(_) => None,
        }
    }

    pub fn pages_mut(&mut self) -> Option<&mut PageList> {
        match &mut self.store {
            Store::Paged(pages) => Some(pages),
            Store::Contiguous(_) => None,
        }
    }

    /// The same positions in no more memory than they take: a contiguous cache grown by doubling
    /// is copied to its length (a parked cache only gets read).
    pub fn compact(self) -> Result<Self> {
        match &self.store {
            Store::Contiguous(layers) if layers.iter().any(|l| l.capacity() > self.len) => {
                self.copy_prefix(self.len, 0)
            }
            _ => Ok(self),
        }
    }

    /// Records that a step of `n` positions went through every layer.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
        if let Store::Contiguous(layers) = &self.store {
            debug_assert!(layers.iter().all(|l| l.len == self.len));
        }
    }

    /// Forgets everything after `len` positions: undoes a step that failed half-way.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        if let Store::Contiguous(layers) = &mut self.store {
            for layer in layers {
                layer.len = layer.len.min(len);
            }
        }
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Contiguous(layers) => layers
                .iter()
                .map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes())
                .sum(),
            Store::Paged(pages) => pages.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_grow_and_keep_history() -> Result<()> {
        let dev = Device::Cpu;
        let mut kv = SequenceKv::new(1, 2, 3, 1, DType::F32, &dev)?;
        let mut all = Vec::new();
        for step in 0..40u32 {
            let n = if step == 0 { 5 } else { 1 };
            let vals: Vec<f32> = (0..2 * n * 3)
                .map(|i| (step * 100 + i as u32) as f32)
                .collect();
            let k = Tensor::from_vec(vals.clone(), (2, n, 3), &dev)?;
            let (ks, vs) = kv.layer(0).expect("contiguous").append(&k, &k, 1000)?;
            kv.advance(n);
            all.push(k);
            let want = Tensor::cat(&all, 1)?;
            assert_eq!(ks.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
            assert_eq!(vs.dims(), want.dims());
        }
        assert_eq!(kv.len(), 44);
        // A copy of a prefix holds exactly those positions, and grows on its own.
        let mut copy = kv.copy_prefix(20, 3)?;
        assert_eq!(copy.len(), 20);
        let extra = Tensor::full(-1f32, (2, 1, 3), &dev)?;
        let (ks, _) = copy
            .layer(0)
            .expect("contiguous")
            .append(&extra, &extra, 1000)?;
        copy.advance(1);
        let want = Tensor::cat(&[Tensor::cat(&all, 1)?.narrow(1, 0, 20)?, extra], 1)?;
        assert_eq!(ks.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
        assert_eq!(kv.len(), 44, "the source is unchanged");
        kv.truncate(10);
        assert_eq!(kv.len(), 10);
        Ok(())
    }
}
