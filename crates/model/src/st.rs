//! Safetensors (de)serialisation of named host tensors.

use std::collections::{BTreeMap, HashMap};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::{HostTensor, ModelError};

/// Little-endian f32 bytes as values (a trailing partial value is ignored).
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Serialises tensors as little-endian f32 safetensors with string metadata.
pub fn serialize(
    tensors: &[HostTensor],
    metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| ModelError::Format {
                    path: t.name.clone(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata: HashMap<String, String> = metadata.into_iter().collect();
    safetensors::serialize(views, Some(metadata)).map_err(|e| ModelError::Format {
        path: "<safetensors>".into(),
        reason: e.to_string(),
    })
}

/// The string metadata of safetensors bytes (empty when there is none).
pub fn metadata(bytes: &[u8], source: &str) -> Result<HashMap<String, String>, ModelError> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Format {
        path: source.to_string(),
        reason: e.to_string(),
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Parses safetensors bytes into f32 host tensors (F32, F16 and BF16 are widened exactly).
/// `source` names the file in errors.
pub fn deserialize(bytes: &[u8], source: &str) -> Result<HashMap<String, HostTensor>, ModelError> {
    let format = |reason: String| ModelError::Format {
        path: source.to_string(),
        reason,
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| format(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(format(format!(
                    "tensor '{name}' has dtype {other:?}; only F32, F16 and BF16 are supported"
                )));
            }
        };
        out.insert(
            name.clone(),
            HostTensor {
                name,
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}
