//! The worker's cache of the weights a coordinator sent: blobs (tensors as the file stores them,
//! and model headers) in one directory, each file named by the blake3 digest of its bytes. The
//! cache is bounded; the least recently used blobs go first.
//!
//! A blob arrives in chunks, appended to `<digest>.partial` in order; a transfer cut half-way
//! resumes at the partial file's length, and a blob is complete once it has all its bytes.
//! Its digest is checked where it is read to be used (`model::weights`, `sent_weights`), which
//! drops an entry that does not match: one pass over the bytes catches a wrong transfer and an
//! entry corrupted on disk alike, and a transfer costs no digest. Nothing is written outside the
//! directory: file names are the hex of a 32-byte digest, never a name from the wire.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use strata_model::stage_weights::BlobRef;

use crate::WorkerError;

/// A directory of blobs named by digest, at most `max_bytes` of complete ones.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    max_bytes: u64,
    /// One writer at a time: two pushes of one blob would interleave their appends.
    writing: Mutex<()>,
}

impl BlobStore {
    /// The cache at `dir` (created if missing), bounded by `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, WorkerError> {
        fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes,
            writing: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn path(&self, blob: &BlobRef) -> PathBuf {
        self.dir.join(blob.hex())
    }

    fn partial_path(&self, blob: &BlobRef) -> PathBuf {
        self.dir.join(format!("{}.partial", blob.hex()))
    }

    /// Bytes of `blob` held: its size when complete, the partial file's length while a transfer
    /// is under way, 0 otherwise. A complete blob is only checked by size here; its digest is
    /// checked when it is read.
    pub fn held(&self, blob: &BlobRef) -> u64 {
        match fs::metadata(self.path(blob)) {
            Ok(meta) if meta.len() == blob.size => return blob.size,
            Ok(_) => {
                let _ = fs::remove_file(self.path(blob));
            }
            Err(_) => {}
        }
        fs::metadata(self.partial_path(blob))
            .map(|m| m.len().min(blob.size.saturating_sub(1)))
            .unwrap_or(0)
    }

    /// The file of a complete blob, marked as just used.
    pub fn complete(&self, blob: &BlobRef) -> Option<PathBuf> {
        let path = self.path(blob);
        let meta = fs::metadata(&path).ok()?;
        if meta.len() != blob.size {
            return None;
        }
        if let Ok(file) = File::options().write(true).open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
        Some(path)
    }

    /// Appends `data` at `offset` of `blob`; returns whether the blob is now complete. Chunks come
    /// in order: `offset` must be where the blob's partial file ends.
    pub fn write(&self, blob: &BlobRef, offset: u64, data: &[u8]) -> Result<bool, WorkerError> {
        if blob.size == 0 || blob.size > self.max_bytes {
            return Err(WorkerError::ResourceExhausted(format!(
                "a blob of {} bytes does not fit this worker's weight cache of {} MiB (--weight-cache-gib)",
                blob.size,
                self.max_bytes >> 20
            )));
        }
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > blob.size) {
            return Err(WorkerError::invalid(format!(
                "chunk of {} bytes at {offset} runs past the end of blob {} ({} bytes)",
                data.len(),
                blob.hex(),
                blob.size
            )));
        }
        let end = offset + data.len() as u64;
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if self.complete(blob).is_some() {
            return Ok(end == blob.size);
        }
        let partial = self.partial_path(blob);
        let held = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if offset != held {
            return Err(WorkerError::FailedPrecondition(format!(
                "chunk of blob {} at {offset}, but this worker holds its first {held} bytes: \
                 send from there (HaveBlobs says where)",
                blob.hex()
            )));
        }
        if held == 0 {
            // A new transfer: room for the whole blob is made before its first byte lands.
            self.evict(blob);
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .map_err(|e| io_error(&partial, e))?;
        file.write_all(data).map_err(|e| io_error(&partial, e))?;
        if end < blob.size {
            return Ok(false);
        }
        drop(file);
        let path = self.path(blob);
        fs::rename(&partial, &path).map_err(|e| io_error(&path, e))?;
        self.evict(blob);
        Ok(true)
    }

    /// Drops the least recently used blobs, complete or partial (the rest of a transfer that was
    /// cut and never resumed), never `keep`, while they and all of `keep` total more than the
    /// bound.
    fn evict(&self, keep: &BlobRef) {
        let keep_bytes = keep.size;
        let keep = keep.hex();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut blobs: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let meta = entry.metadata().ok()?;
                let digest = name.strip_suffix(".partial").unwrap_or(&name);
                (digest.len() == 64 && digest != keep && meta.is_file()).then(|| {
                    (
                        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        meta.len(),
                        entry.path(),
                    )
                })
            })
            .collect();
        let mut total: u64 = keep_bytes + blobs.iter().map(|(_, size, _)| size).sum::<u64>();
        blobs.sort();
        for (_, size, path) in blobs {
            if total <= self.max_bytes {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                tracing::info!(blob = %path.display(), bytes = size, "weight cache full: dropped the least recently used blob");
                total -= size;
            }
        }
    }
}

fn io_error(path: &Path, e: std::io::Error) -> WorkerError {
    WorkerError::Model(strata_model::ModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_model::stage_weights::digest_bytes;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn chunks_in_order_make_a_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let data = bytes(10_000, 1);
        let blob = digest_bytes(&data);
        assert_eq!(store.held(&blob), 0);
        assert!(!store.write(&blob, 0, &data[..4000]).unwrap());
        assert_eq!(store.held(&blob), 4000);
        assert!(store.complete(&blob).is_none());
        assert!(store.write(&blob, 4000, &data[4000..]).unwrap());
        assert_eq!(store.held(&blob), 10_000);
        assert_eq!(fs::read(store.complete(&blob).unwrap()).unwrap(), data);
    }

    #[test]
    fn a_cut_transfer_resumes_where_it_stopped_and_nowhere_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let data = bytes(9_000, 2);
        let blob = digest_bytes(&data);
        store.write(&blob, 0, &data[..3000]).unwrap();
        // A new push (the first was cut) must start at 3000.
        let early = store.write(&blob, 0, &data[..3000]).unwrap_err();
        assert!(
            early.to_string().contains("holds its first 3000 bytes"),
            "{early}"
        );
        assert!(store.write(&blob, 3000, &data[3000..]).unwrap());
        assert!(store.complete(&blob).is_some());
    }

    #[test]
    fn chunks_past_the_blob_or_the_cache_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
        let data = bytes(5_000, 3);
        let blob = digest_bytes(&data);
        let past = store.write(&blob, 4_000, &data[..2_000]).unwrap_err();
        assert!(past.to_string().contains("past the end"), "{past}");
        let huge = BlobRef {
            digest: blob.digest,
            size: 2 << 20,
        };
        let e = store.write(&huge, 0, &data).unwrap_err();
        assert!(matches!(e, WorkerError::ResourceExhausted(_)), "{e}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn the_least_recently_used_blobs_go_when_the_cache_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 25_000).unwrap();
        let blobs: Vec<(BlobRef, Vec<u8>)> = (0..3)
            .map(|i| {
                let data = bytes(10_000, 10 + i);
                (digest_bytes(&data), data)
            })
            .collect();
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        for (blob, data) in &blobs[..2] {
            store.write(blob, 0, data).unwrap();
            File::options()
                .write(true)
                .open(store.path(blob))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        // Blob 0 is used again, so blob 1 is the least recently used when blob 2 arrives.
        store.complete(&blobs[0].0).unwrap();
        store.write(&blobs[2].0, 0, &blobs[2].1).unwrap();
        assert!(store.complete(&blobs[0].0).is_some());
        assert!(store.complete(&blobs[1].0).is_none());
        assert!(store.complete(&blobs[2].0).is_some());
    }

    #[test]
    fn cut_transfers_count_against_the_bound_and_go_first_when_older() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 25_000).unwrap();
        let blobs: Vec<(BlobRef, Vec<u8>)> = (0..3)
            .map(|i| {
                let data = bytes(10_000, 20 + i);
                (digest_bytes(&data), data)
            })
            .collect();
        // Blob 0's transfer is cut at 8,000 bytes and never resumed; blob 1 arrives whole.
        store.write(&blobs[0].0, 0, &blobs[0].1[..8_000]).unwrap();
        File::options()
            .write(true)
            .open(store.partial_path(&blobs[0].0))
            .unwrap()
            .set_modified(SystemTime::now() - std::time::Duration::from_secs(60))
            .unwrap();
        store.write(&blobs[1].0, 0, &blobs[1].1).unwrap();
        assert_eq!(store.held(&blobs[0].0), 8_000);
        // Blob 2's transfer needs room: the cut one, the oldest, goes as it starts.
        store.write(&blobs[2].0, 0, &blobs[2].1[..10]).unwrap();
        assert_eq!(store.held(&blobs[0].0), 0);
        assert!(!store.partial_path(&blobs[0].0).exists());
        assert!(store.complete(&blobs[1].0).is_some());
        assert!(store.write(&blobs[2].0, 10, &blobs[2].1[10..]).unwrap());
        let total: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 25_000, "{total}");
    }
}
