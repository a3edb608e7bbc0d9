//! Paged key/value storage shared by every sequence of a stage, for accelerators.
//!
//! On a GPU a step's cost is the number of kernels it launches, not the bytes it moves: per-sequence
//! caches make attention `O(sequences)` launches per layer (32 sequences: hundreds per layer). Here
//! each layer's keys and values of *all* sequences live in one tensor `[kv_heads, pages × PAGE, head_dim]`,
//! a sequence owns a list of pages, and a step writes every new row with one scatter and reads every
//! decoding sequence's history with one gather, so a layer's attention is a fixed handful of kernels
//! whatever the batch. (On the CPU the gather's copy costs more than launches do, so CPU stages keep
//! per-sequence caches; see `kv_cache.rs`.)

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};

/// Positions per page.
pub const PAGE: usize = 16;
/// Pages a new pool starts with; it doubles when they run out.
const INITIAL_PAGES: usize = 64;

type FreePages = Arc<Mutex<Vec<u32>>>;

/// The pages one sequence holds, in position order. Dropping it returns them to the pool.
#[derive(Debug)]
pub struct PageList {
    pages: Vec<u32>,
    free: FreePages,
    page_bytes: usize,
}

impl PageList {
    /// The pool row that holds position `pos` (which must be within the reserved pages).
    pub fn row(&self, pos: usize) -> u32 {
        self.pages[pos / PAGE] * PAGE as u32 + (pos % PAGE) as u32
    }

    /// Bytes of the pool this sequence holds (keys and values of every layer).
    pub fn bytes(&self) -> usize {
        self.pages.len() * self.page_bytes
    }
}

impl Drop for PageList {
    fn drop(&mut self) {
        lock(&self.free).append(&mut self.pages);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every layer's keys and values for all sequences of a stage.
#[derive(Debug)]
pub struct KvPool {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    pages: usize,
    /// The most pages the pool may grow to (from the worker's KV memory limit).
    max_pages: usize,
    free: FreePages,
    /// Bytes of one page over all layers, keys and values.
    page_bytes: usize,
    /// Counts reallocations of the tensors (which move their rows in memory).
    generation: u64,
}

impl KvPool {
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let rows = INITIAL_PAGES * PAGE;
        let zeros = || Tensor::zeros((kv_heads, rows, head_dim), dtype, device);
        Ok(Self {
            keys: (0..layers).map(|_| zeros()).collect::<Result<_>>()?,
            values: (0..layers).map(|_| zeros()).collect::<Result<_>>()?,
            pages: INITIAL_PAGES,
            max_pages: usize::MAX,
            free: Arc::new(Mutex::new((0..INITIAL_PAGES as u32).rev().collect())),
            page_bytes: 2 * layers * kv_heads * PAGE * head_dim * dtype.size_in_bytes(),
            generation: 0,
        })
    }

    /// Caps the pool at `bytes` (keys and values of every layer, at least one page). An unused pool
    /// larger than that is reallocated smaller; a pool in use never shrinks.
    pub fn limit_bytes(&mut self, bytes: usize) -> Result<()> {
        let limit = (bytes / self.page_bytes).max(1);
        let unused = lock(&self.free).len() == self.pages;
        if limit < self.pages && unused {
            let shrink = |old: &Tensor| -> Result<Tensor> {
                let (heads, _, head_dim) = old.dims3()?;
                Tensor::zeros((heads, limit * PAGE, head_dim), old.dtype(), old.device())
            };
            self.keys = self.keys.iter().map(shrink).collect::<Result<_>>()?;
            self.values = self.values.iter().map(shrink).collect::<Result<_>>()?;
            *lock(&self.free) = (0..limit as u32).rev().collect();
            self.pages = limit;
            self.generation += 1;
        }
        self.max_pages = limit.max(self.pages);
        Ok(())
    }

    /// An empty page list for a new sequence.
    pub fn sequence(&self) -> PageList {
        PageList {
            pages: Vec::new(),
            free: self.free.clone(),
            page_bytes: self.page_bytes,
        }
    }

    /// Makes sure `list` has pages for its first `positions` positions, growing the pool if needed.
    pub fn reserve(&mut self, list: &mut PageList, positions: usize) -> Result<()> {
        let needed = positions.div_ceil(PAGE);
        while list.pages.len() < needed {
            let page = lock(&self.free).pop();
            match page {
                Some(page) => list.pages.push(page),
                None => self.grow(needed - list.pages.len())?,
            }
        }
        Ok(())
    }

    /// Doubles the pool (or more, to fit `at_least` new pages); existing rows keep their indices.
    fn grow(&mut self, at_least: usize) -> Result<()> {
        let pages = (self.pages * 2)
            .max(self.pages + at_least)
            .min(self.max_pages);
        if pages < self.pages + at_least {
            candle_core::bail!(
                "the KV pool is full: {} of at most {} pages of {} positions in use",
                self.pages,
                self.max_pages,
                PAGE
            );
        }
        let grow = |old: &Tensor| -> Result<Tensor> {
            let (heads, _, head_dim) = old.dims3()?;
            let new = Tensor::zeros((heads, pages * PAGE, head_dim), old.dtype(), old.device())?;
            new.slice_set(old, 1, 0)?;
            Ok(new)
        };
        self.keys = self.keys.iter().map(grow).collect::<Result<_>>()?;
        self.values = self.values.iter().map(grow).collect::<Result<_>>()?;
        lock(&self.free).extend((self.pages as u32..pages as u32).rev());
        self.pages = pages;
        self.generation += 1;
        Ok(())
    }

    /// A new page list holding a copy of `source`'s first `len` positions (rows copied on the
    /// device, a gather and a scatter per layer and tensor). Fails, taking no pages, when the pool
    /// has no room.
    pub fn copy_prefix(&mut self, source: &PageList, len: usize) -> Result<PageList> {
        let mut copy = self.sequence();
        self.reserve(&mut copy, len)?;
        if len == 0 {
            return Ok(copy);
        }
        let device = self.keys[0].device().clone();
        let from: Vec<u32> = (0..len).map(|p| source.row(p)).collect();
        let to: Vec<u32> = (0..len).map(|p| copy.row(p)).collect();
        let from = Tensor::from_vec(from, len, &device)?;
        let to = Tensor::from_vec(to, (1, len, 1), &device)?;
        for tensor in self.keys.iter().chain(&self.values) {
            let (heads, _, head_dim) = tensor.dims3()?;
            let rows = tensor.index_select(&from, 1)?;
            let to = to.broadcast_as((heads, len, head_dim))?.contiguous()?;
            tensor.scatter_set(&to, &rows, 1)?;
        }
        Ok(copy)
    }

    /// Changes whenever the pool's tensors are reallocated (kernels recorded against the old
    /// ones must not run again).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Layer `i`'s keys and values, `[kv_heads, rows, head_dim]`.
    pub fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        (&self.keys[i], &self.values[i])
    }

    /// Bytes the pool holds on its device, used or not.
    pub fn capacity_bytes(&self) -> usize {
        self.pages * self.page_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_reused_and_the_pool_grows_keeping_rows() -> Result<()> {
        let dev = Device::Cpu;
        let mut pool = KvPool::new(1, 1, 2, DType::F32, &dev)?;
        let mut a = pool.sequence();
        pool.reserve(&mut a, 3 * PAGE + 1)?;
        assert_eq!(a.bytes(), 4 * pool.page_bytes);
        // Mark a row of `a`, then force growth and check it survived.
        let row = a.row(PAGE + 3) as usize;
        let (k, _) = pool.layer(0);
        k.slice_set(&Tensor::new(&[[[7f32, 8.0]]], &dev)?, 1, row)?;
        let mut b = pool.sequence();
        pool.reserve(&mut b, INITIAL_PAGES * PAGE)?;
        assert!(pool.pages > INITIAL_PAGES);
        let (k, _) = pool.layer(0);
        assert_eq!(
            k.narrow(1, row, 1)?.flatten_all()?.to_vec1::<f32>()?,
            [7.0, 8.0]
        );
        // No page is held twice.
        let mut held: Vec<u32> = a.pages.iter().chain(&b.pages).copied().collect();
        held.sort_unstable();
        held.dedup();
        assert_eq!(held.len(), a.pages.len() + b.pages.len());
        // Dropping a sequence frees its pages for the next one.
        let free_before = pool.free.lock().unwrap().len();
        drop(a);
        assert_eq!(pool.free.lock().unwrap().len(), free_before + 4);
        Ok(())
    }

    #[test]
    fn a_copied_prefix_has_its_own_pages_with_the_same_rows() -> Result<()> {
        let dev = Device::Cpu;
        let mut pool = KvPool::new(2, 1, 2, DType::F32, &dev)?;
        let mut a = pool.sequence();
        pool.reserve(&mut a, 2 * PAGE + 5)?;
        for (layer, tensor) in pool.keys.iter().chain(&pool.values).enumerate() {
            for p in 0..2 * PAGE + 5 {
                let value = (layer * 1000 + p) as f32;
                let row = Tensor::new(&[[[value, -value]]], &dev)?;
                tensor.slice_set(&row, 1, a.row(p) as usize)?;
            }
        }
        let b = pool.copy_prefix(&a, PAGE + 3)?;
        assert_eq!(b.pages.len(), 2);
        assert!(b.pages.iter().all(|p| !a.pages.contains(p)));
        for (layer, tensor) in pool.keys.iter().chain(&pool.values).enumerate() {
            for p in 0..PAGE + 3 {
                let row = tensor.narrow(1, b.row(p) as usize, 1)?.flatten_all()?;
                let value = (layer * 1000 + p) as f32;
                assert_eq!(
                    row.to_vec1::<f32>()?,
                    [value, -value],
                    "layer {layer} position {p}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn growth_stops_at_the_limit() -> Result<()> {
        let mut pool = KvPool::new(1, 1, 2, DType::F32, &Device::Cpu)?;
        pool.limit_bytes(pool.page_bytes * 3)?;
        assert_eq!(pool.pages, 3, "an unused pool shrinks to its limit");
        pool.limit_bytes(pool.page_bytes * (INITIAL_PAGES + 10))?;
        let mut a = pool.sequence();
        pool.reserve(&mut a, (INITIAL_PAGES + 10) * PAGE)?;
        assert_eq!(pool.pages, INITIAL_PAGES + 10, "grew only to the limit");
        let mut b = pool.sequence();
        let err = pool.reserve(&mut b, 1).unwrap_err().to_string();
        assert!(err.contains("KV pool is full"), "{err}");
        drop(a);
        pool.reserve(&mut b, PAGE)?;
        Ok(())
    }
}
