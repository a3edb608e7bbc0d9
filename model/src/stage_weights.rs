//! Which of a GGUF model's tensors a stage reads, and the digests that name their bytes when the
//! coordinator sends them to a worker that holds no model file (the worker keeps them in a
//! content-addressed cache; see `strata-worker`'s `blob_store`).
//!
//! Both ends decide a stage's tensors with [`stage_tensor_names`]: the coordinator to choose what
//! to send, the worker to refuse a tensor it was not planned to hold.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::gguf_file;

/// A blake3 digest of a blob's bytes.
pub type Digest = [u8; 32];

/// Bytes of one blob, a tensor as the file stores it or a model's GGUF header, named by digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobRef {
    pub digest: Digest,
    pub size: u64,
}

impl BlobRef {
    /// The digest in lowercase hex, as the cache names the blob's file.
    pub fn hex(&self) -> String {
        hex(&self.digest)
    }
}

/// Where each tensor of a model whose header is a file of its own lives: one verified blob file per
/// tensor name.
pub type TensorBlobs = Arc<BTreeMap<String, (BlobRef, PathBuf)>>;

/// The digest of everything `reader` yields, and how many bytes that was.
pub fn digest_reader(mut reader: impl Read) -> std::io::Result<BlobRef> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(BlobRef {
        digest: *hasher.finalize().as_bytes(),
        size,
    })
}

/// The digest of `bytes`.
pub fn digest_bytes(bytes: &[u8]) -> BlobRef {
    BlobRef {
        digest: *blake3::hash(bytes).as_bytes(),
        size: bytes.len() as u64,
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes a GGUF tensor takes in the file, or `None` if its shape is not whole blocks of its type.
pub fn gguf_tensor_bytes(info: &gguf_file::TensorInfo) -> Option<u64> {
    let elements = info.shape.elem_count();
    let block = info.ggml_dtype.block_size();
    elements
        .is_multiple_of(block)
        .then(|| (elements / block * info.ggml_dtype.type_size()) as u64)
}

/// Whether `blob` is the size tensor `name`'s header entry says; the refusal says why not.
pub fn check_tensor_size(
    name: &str,
    info: &gguf_file::TensorInfo,
    blob: &BlobRef,
) -> Result<(), String> {
    match gguf_tensor_bytes(info) {
        Some(size) if size == blob.size => Ok(()),
        want => Err(format!(
            "tensor {name}: a blob of {} bytes, but its header entry ({:?} {:?}) takes {}",
            blob.size,
            info.ggml_dtype,
            info.shape.dims(),
            want.map_or("no whole number of blocks".into(), |w| format!("{w}"))
        )),
    }
}

/// Where a GGUF file keeps its header and each tensor's bytes.
#[derive(Debug, Clone)]
pub struct GgufLayout {
    /// Bytes of the header (metadata and tensor directory, padded): the file's first bytes.
    pub header_bytes: u64,
    /// Each tensor's (absolute offset, size) in the file.
    pub tensors: BTreeMap<String, (u64, u64)>,
}

impl GgufLayout {
    /// The layout of `model`'s GGUF file.
    pub fn read(model: &crate::ModelFile) -> Result<Self, crate::ModelError> {
        let content = model.gguf_content()?;
        let tensors = content
            .tensor_infos
            .iter()
            .map(|(name, info)| {
                let size = gguf_tensor_bytes(info).ok_or_else(|| {
                    crate::ModelError::invalid(
                        &model.path,
                        format!("tensor {name} is not whole blocks of {:?}", info.ggml_dtype),
                    )
                })?;
                Ok((
                    name.clone(),
                    (content.tensor_data_offset + info.offset, size),
                ))
            })
            .collect::<Result<_, crate::ModelError>>()?;
        Ok(Self {
            header_bytes: content.tensor_data_offset,
            tensors,
        })
    }
}

/// The tensors a stage of `layers` (of `num_layers`) reads, by name, sorted, from the names a GGUF
/// file holds: its layers' `blk.N.*`; the token embedding on the first stage (and on the last when
/// the head is tied to it, as the file then has no `output.weight`); the final norm and head on the
/// last; and every other tensor without a layer (such as `rope_freqs.weight`) on every stage.
pub fn stage_tensor_names<'a>(
    names: impl IntoIterator<Item = &'a str>,
    layers: Range<usize>,
    num_layers: usize,
) -> Vec<String> {
    let names: Vec<&str> = names.into_iter().collect();
    let first = layers.start == 0;
    let last = layers.end == num_layers;
    let tied = !names.contains(&"output.weight");
    let mut chosen: Vec<String> = names
        .iter()
        .filter(|name| match layer_of(name) {
            Some(i) => layers.contains(&i),
            None if name.starts_with("token_embd.") => first || (last && tied),
            None if name.starts_with("output_norm.") || name.starts_with("output.") => last,
            None => true,
        })
        .map(|name| name.to_string())
        .collect();
    chosen.sort();
    chosen
}

/// The tensors several stages read together (a calibration's probes), sorted, each once.
pub fn stages_tensor_names<'a>(
    names: impl IntoIterator<Item = &'a str>,
    stages: &[Range<usize>],
    num_layers: usize,
) -> Vec<String> {
    let names: Vec<&str> = names.into_iter().collect();
    let mut chosen: Vec<String> = stages
        .iter()
        .flat_map(|layers| stage_tensor_names(names.iter().copied(), layers.clone(), num_layers))
        .collect();
    chosen.sort();
    chosen.dedup();
    chosen
}

/// Layers in each probe stage of a worker's calibration.
pub const PROBE_LAYERS: usize = 4;

/// The stages a calibration loads and times, for a model of `num_layers` (at least 1): bare layers
/// (neither embedding nor head, where the model has three layers or more), the first stage's and
/// the last's, each of up to [`PROBE_LAYERS`] layers. A worker without the model file is sent
/// exactly their tensors.
pub fn probe_stages(num_layers: usize) -> [Range<usize>; 3] {
    let n = num_layers.max(1);
    let layers = n.saturating_sub(2).clamp(1, PROBE_LAYERS);
    let bare = if n >= 3 { 1..1 + layers } else { 0..1 };
    [bare, 0..layers, n - layers..n]
}

/// The layer of a `blk.N.*` tensor.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &[&str] = &[
        "token_embd.weight",
        "rope_freqs.weight",
        "blk.0.attn_q.weight",
        "blk.0.ffn_down.weight",
        "blk.1.attn_q.weight",
        "blk.2.attn_q.weight",
        "blk.10.attn_q.weight",
        "output_norm.weight",
        "output.weight",
    ];

    #[test]
    fn stages_take_their_layers_and_the_parts_at_their_ends() {
        let cases: &[(Range<usize>, &[&str])] = &[
            (
                0..1,
                &[
                    "blk.0.attn_q.weight",
                    "blk.0.ffn_down.weight",
                    "rope_freqs.weight",
                    "token_embd.weight",
                ],
            ),
            (
                1..3,
                &[
                    "blk.1.attn_q.weight",
                    "blk.2.attn_q.weight",
                    "rope_freqs.weight",
                ],
            ),
            (
                3..11,
                &[
                    "blk.10.attn_q.weight",
                    "output.weight",
                    "output_norm.weight",
                    "rope_freqs.weight",
                ],
            ),
        ];
        for (layers, want) in cases {
            let got = stage_tensor_names(FILE.iter().copied(), layers.clone(), 11);
            assert_eq!(got, *want, "layers {layers:?}");
        }
    }

    #[test]
    fn a_tied_head_sends_the_embedding_to_the_last_stage_too() {
        let tied: Vec<&str> = FILE
            .iter()
            .copied()
            .filter(|n| *n != "output.weight")
            .collect();
        let last = stage_tensor_names(tied.iter().copied(), 3..11, 11);
        assert!(last.contains(&"token_embd.weight".to_string()), "{last:?}");
        let middle = stage_tensor_names(tied.iter().copied(), 1..3, 11);
        assert!(!middle.contains(&"token_embd.weight".to_string()));
        let untied = stage_tensor_names(FILE.iter().copied(), 3..11, 11);
        assert!(!untied.contains(&"token_embd.weight".to_string()));
    }

    #[test]
    fn probes_are_bare_first_and_last_layers_whatever_the_depth() {
        let cases: &[(usize, [Range<usize>; 3])] = &[
            (1, [0..1, 0..1, 0..1]),
            (2, [0..1, 0..1, 1..2]),
            (3, [1..2, 0..1, 2..3]),
            (6, [1..5, 0..4, 2..6]),
            (30, [1..5, 0..4, 26..30]),
        ];
        for (n, want) in cases {
            assert_eq!(probe_stages(*n), *want, "{n} layers");
        }
    }

    #[test]
    fn several_stages_read_each_tensor_once() {
        let got = stages_tensor_names(FILE.iter().copied(), &[0..1, 1..3, 0..2], 11);
        let want = [
            "blk.0.attn_q.weight",
            "blk.0.ffn_down.weight",
            "blk.1.attn_q.weight",
            "blk.2.attn_q.weight",
            "rope_freqs.weight",
            "token_embd.weight",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn digests_of_a_reader_and_of_bytes_agree() {
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let a = digest_reader(&bytes[..]).unwrap();
        assert_eq!(a, digest_bytes(&bytes));
        assert_eq!(a.size, 3_000_000);
        assert_ne!(a, digest_bytes(&bytes[1..]));
        assert_eq!(a.hex().len(), 64);
    }
}
