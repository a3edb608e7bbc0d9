//! The u32 index arrays a step needs on its device (token ids, positions, pool rows, lengths, last
//! rows), packed into one host buffer and uploaded in one copy.
//!
//! On an accelerator every upload is a host call of its own (an allocation and a copy), and at batch
//! 1 a stage is bound by host time, not by the device: five small uploads per step were a measurable
//! part of what a stage boundary costs. Each array becomes a view into the one uploaded buffer.

use candle_core::{Device, Result, Tensor};

/// Where one array sits in the packed buffer.
#[derive(Debug, Clone, Copy)]
pub struct IndexSlot {
    start: usize,
    len: usize,
}

impl IndexSlot {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Arrays collected on the host, not yet uploaded.
#[derive(Debug, Default)]
pub struct IndexBuffer {
    host: Vec<u32>,
}

impl IndexBuffer {
    /// Appends an array; its tensor is [`UploadedIndexes::get`] of the returned slot.
    pub fn push(&mut self, values: impl IntoIterator<Item = u32>) -> IndexSlot {
        let start = self.host.len();
        self.host.extend(values);
        IndexSlot {
            start,
            len: self.host.len() - start,
        }
    }

    /// The packed arrays, in slot order.
    pub fn values(&self) -> &[u32] {
        &self.host
    }

    /// Copies every array to `device` at once.
    pub fn upload(self, device: &Device) -> Result<UploadedIndexes> {
        let len = self.host.len();
        // An empty step still gets a (one-element) buffer, so that empty slots narrow cleanly.
        let host = if len == 0 { vec![0] } else { self.host };
        let n = host.len();
        Ok(UploadedIndexes(Tensor::from_vec(host, n, device)?))
    }
}

/// The packed arrays on the device.
#[derive(Debug)]
pub struct UploadedIndexes(Tensor);

impl UploadedIndexes {
    /// A buffer already on the device holding [`IndexBuffer::values`] (a CUDA graph's own).
    pub fn on_device(buffer: Tensor) -> Self {
        Self(buffer)
    }

    /// The array of `slot`: a `[len]` u32 view into the buffer (contiguous, with an offset).
    pub fn get(&self, slot: IndexSlot) -> Result<Tensor> {
        self.0.narrow(0, slot.start, slot.len)
    }

    /// [`UploadedIndexes::get`] of an array the step may not have.
    pub fn get_some(&self, slot: Option<IndexSlot>) -> Result<Option<Tensor>> {
        slot.map(|slot| self.get(slot)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_reads_back_its_own_array() -> Result<()> {
        let mut buffer = IndexBuffer::default();
        let a = buffer.push([7, 8, 9]);
        let empty = buffer.push([]);
        let b = buffer.push(0..4);
        let uploaded = buffer.upload(&Device::Cpu)?;
        assert_eq!(uploaded.get(a)?.to_vec1::<u32>()?, vec![7, 8, 9]);
        assert_eq!(uploaded.get(b)?.to_vec1::<u32>()?, vec![0, 1, 2, 3]);
        assert!(uploaded.get(empty)?.to_vec1::<u32>()?.is_empty());
        // A view with an offset indexes like a tensor of its own.
        let table = Tensor::arange(0u32, 20, &Device::Cpu)?.reshape((10, 2))?;
        let picked = table.index_select(&uploaded.get(b)?, 0)?;
        assert_eq!(
            picked.to_vec2::<u32>()?,
            vec![[0, 1], [2, 3], [4, 5], [6, 7]]
        );
        Ok(())
    }
}
