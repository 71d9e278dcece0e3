//! A whole decoder model written as GGUF, in the layout llama.cpp loads.

use std::path::Path;

use super::config::metadata;
use super::names::{permute_rows, spec_permutation, tensor_name, Direction};
use super::quant::{can_encode, quantize};
use super::types::{GgmlType, MetaValue};
use super::writer::{write_gguf, TensorEntry};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::weights::{tensor_specs, TensorSpec};

/// The type a tensor of `cols`-long rows is stored as when the model is exported as `ty`: vectors
/// stay F32 (as llama.cpp's converter keeps them), rows that do not fill whole blocks fall back
/// to F16.
fn stored_type(ty: GgmlType, cols: usize, is_vector: bool) -> GgmlType {
    if is_vector {
        GgmlType::F32
    } else if cols % ty.block_size() != 0 {
        GgmlType::F16
    } else {
        ty
    }
}

/// Writes the model described by `cfg` to `path` with matrices as `ty` (F32, F16, BF16 or
/// Q8_0). `tensor` gives each weight of [`tensor_specs`] in Hugging Face layout; `vocabulary`
/// is the `tokenizer.*` metadata to include (llama.cpp needs it to load the file).
pub fn write_model(
    path: &Path,
    cfg: &ModelConfig,
    name: &str,
    vocabulary: &[(String, MetaValue)],
    ty: GgmlType,
    mut tensor: impl FnMut(&TensorSpec) -> Result<Vec<f32>>,
) -> Result<()> {
    if !can_encode(ty) {
        return Err(Error::InvalidArgument(format!(
            "GGUF export writes F32, F16, BF16 or Q8_0, not {ty}"
        )));
    }
    let mut meta = metadata(cfg, name)?;
    meta.push(("general.file_type".into(), MetaValue::U32(ty.file_type())));
    meta.extend(vocabulary.iter().cloned());
    let specs = tensor_specs(cfg);
    let entries: Vec<TensorEntry> = specs
        .iter()
        .map(|s| {
            let vector = s.file_shape().len() == 1;
            let rows = (!vector).then_some(s.rows);
            TensorEntry::new(
                tensor_name(s.slot),
                s.cols,
                rows,
                stored_type(ty, s.cols, vector),
            )
        })
        .collect();
    write_gguf(path, &meta, &entries, |i| {
        let spec = &specs[i];
        let values = tensor(spec)?;
        let values = match spec_permutation(cfg, spec) {
            Some((heads, cols)) => permute_rows(&values, heads, cols, Direction::HfToGguf),
            None => values,
        };
        Ok(quantize(entries[i].ggml_type, &values))
    })
}
