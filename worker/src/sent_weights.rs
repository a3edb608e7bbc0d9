//! A stage's weights as a coordinator sent them (`LoadStageRequest.weights`), checked before any is
//! used: the header is the model the coordinator planned for (by fingerprint), the tensors are
//! exactly those the stage's layers read, each the size its header entry implies and held whole in
//! the weight cache. What passes is a [`ModelFile`] whose tensors are the cache's blobs.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use strata_model::stage_weights::{
    check_tensor_size, digest_reader, probe_stages, stages_tensor_names, BlobRef,
};
use strata_model::ModelFile;
use strata_proto::v1;

use crate::blob_store::BlobStore;
use crate::WorkerError;

/// A blob named on the wire, its digest checked for length.
pub fn blob_from_wire(blob: Option<&v1::Blob>, what: &str) -> Result<BlobRef, WorkerError> {
    let blob = blob.ok_or_else(|| WorkerError::invalid(format!("{what}: no blob")))?;
    let digest: [u8; 32] = blob.digest.as_slice().try_into().map_err(|_| {
        WorkerError::invalid(format!(
            "{what}: a digest of {} bytes; blake3 digests are 32",
            blob.digest.len()
        ))
    })?;
    Ok(BlobRef {
        digest,
        size: blob.size,
    })
}

/// What sent weights are for: the stages whose tensors they must be, exactly.
#[derive(Debug, Clone)]
pub enum Part {
    /// A stage of these layers, to load.
    Stage(Range<usize>),
    /// The probe stages of a calibration (`probe_stages` of the model's depth).
    Probes,
}

impl Part {
    fn stages(&self, num_layers: usize) -> Vec<Range<usize>> {
        match self {
            Part::Stage(layers) => vec![layers.clone()],
            Part::Probes => probe_stages(num_layers).to_vec(),
        }
    }
}

/// The model to load `part` from: the header and tensors of `weights`, all in `store`.
pub fn stage_model(
    store: &BlobStore,
    fingerprint: &str,
    part: &Part,
    weights: &v1::StageWeights,
) -> Result<ModelFile, WorkerError> {
    let header = blob_from_wire(weights.header.as_ref(), "the model header")?;
    let header_path = store.complete(&header).ok_or_else(|| {
        WorkerError::FailedPrecondition(format!(
            "the model header (blob {}) is not in this worker's weight cache: push it first",
            header.hex()
        ))
    })?;
    let found = std::fs::File::open(&header_path)
        .map(std::io::BufReader::new)
        .and_then(digest_reader)
        .map_err(|e| WorkerError::Model(strata_model::ModelError::io(&header_path, e)))?;
    if found != header {
        let _ = std::fs::remove_file(&header_path);
        return Err(WorkerError::DataLoss(format!(
            "the cached model header ({}) does not match its digest; the entry is dropped: send it again",
            header.hex()
        )));
    }
    let mut model = ModelFile::open(&header_path)?;
    if model.fingerprint != fingerprint {
        return Err(WorkerError::FailedPrecondition(format!(
            "the header sent is model {}, but the stage is planned for model {fingerprint}",
            model.fingerprint
        )));
    }
    let num_layers = model.config.num_layers;
    let stages = part.stages(num_layers);
    if let Some(layers) = stages
        .iter()
        .find(|layers| layers.start >= layers.end || layers.end > num_layers)
    {
        return Err(WorkerError::invalid(format!(
            "layer range {}..{} is not a non-empty part of 0..{num_layers}",
            layers.start, layers.end
        )));
    }
    let what = stages
        .iter()
        .map(|layers| format!("{}..{}", layers.start, layers.end))
        .collect::<Vec<_>>()
        .join(", ");
    let content = model.gguf_content()?;
    let wanted: BTreeSet<String> = stages_tensor_names(
        content.tensor_infos.keys().map(String::as_str),
        &stages,
        num_layers,
    )
    .into_iter()
    .collect();
    let mut blobs = BTreeMap::new();
    for tensor in &weights.tensors {
        let name = &tensor.name;
        if !wanted.contains(name) {
            return Err(WorkerError::invalid(format!(
                "tensor {name:?} is not one that layers {what} of {} read",
                model.name
            )));
        }
        let blob = blob_from_wire(tensor.blob.as_ref(), name)?;
        let info = &content.tensor_infos[name];
        check_tensor_size(name, info, &blob).map_err(WorkerError::InvalidArgument)?;
        let path = store.complete(&blob).ok_or_else(|| {
            WorkerError::FailedPrecondition(format!(
                "tensor {name} (blob {}) is not in this worker's weight cache: push it first",
                blob.hex()
            ))
        })?;
        if blobs.insert(name.clone(), (blob, path)).is_some() {
            return Err(WorkerError::invalid(format!(
                "tensor {name} is named twice"
            )));
        }
    }
    if let Some(missing) = wanted.iter().find(|name| !blobs.contains_key(*name)) {
        return Err(WorkerError::invalid(format!(
            "tensor {missing}, which layers {what} read, was not sent"
        )));
    }
    model.blobs = Some(Arc::new(blobs));
    Ok(model)
}
