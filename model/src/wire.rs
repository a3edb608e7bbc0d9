//! The one conversion of a model's description to the wire, shared by workers (`WorkerInfo`) and the
//! coordinator (`CoordinatorInfo`).

use strata_proto::v1;

use crate::ModelFile;

/// What `Info` reports about a model.
pub fn model_info(model: &ModelFile) -> v1::ModelInfo {
    let c = &model.config;
    v1::ModelInfo {
        fingerprint: model.fingerprint.clone(),
        name: model.name.clone(),
        architecture: c.family.gguf_architecture.into(),
        format: model.format.as_str().into(),
        num_layers: c.num_layers as u32,
        hidden_size: c.hidden_size as u32,
        vocab_size: c.vocab_size as u32,
        context_length: c.context_length as u32,
    }
}
