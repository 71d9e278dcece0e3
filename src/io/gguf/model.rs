//! A decoder model stored as GGUF: its configuration, weights in Hugging Face layout, tokenizer
//! and chat template.

use std::path::Path;

use tokenizers::Tokenizer;

use super::config::model_config;
use super::names::{permute_rows, spec_permutation, tensor_name, Direction};
use super::tokenizer::{
    chat_template, from_metadata, special_tokens, vocabulary_keys, SpecialTokens,
};
use super::types::MetaValue;
use super::GgufFile;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::weights::TensorSpec;

/// An opened GGUF model file.
pub struct GgufModel {
    pub file: GgufFile,
    pub config: ModelConfig,
    pub tokenizer: Option<Tokenizer>,
    /// BOS/EOS ids and whether plain text starts with BOS.
    pub special: SpecialTokens,
    pub chat_template: Option<String>,
    /// The `tokenizer.*` metadata, carried into GGUF files exported from this model.
    pub vocabulary: Vec<(String, MetaValue)>,
}

impl GgufModel {
    /// Opens `path` and reads its configuration and tokenizer (the weights are read on demand).
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let meta = file.metadata();
        let config = model_config(file.header()).map_err(|m| Error::format(path, m))?;
        let tokenizer = from_metadata(meta).map_err(|m| Error::format(path, m))?;
        if let Some(t) = &tokenizer {
            let n = t.get_vocab_size(true);
            if n > config.vocab_size {
                return Err(Error::format(
                    path,
                    format!(
                        "the tokenizer has {n} tokens but the model only {}",
                        config.vocab_size
                    ),
                ));
            }
        }
        let special = match &tokenizer {
            Some(t) => {
                special_tokens(meta, t.get_vocab_size(true)).map_err(|m| Error::format(path, m))?
            }
            None => SpecialTokens::default(),
        };
        Ok(GgufModel {
            special,
            chat_template: chat_template(meta),
            vocabulary: vocabulary_keys(meta),
            tokenizer,
            config,
            file,
        })
    }

    /// The tensor of `spec` as f32 in Hugging Face layout: shape checked, dequantized, and q/k
    /// rows put back in Hugging Face order.
    pub fn read_f32(&self, spec: &TensorSpec) -> Result<Vec<f32>> {
        let name = tensor_name(spec.slot);
        let info = self
            .file
            .header()
            .tensor(&name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                path: self.file.path().to_path_buf(),
            })?;
        let mut want = vec![spec.cols as u64];
        if spec.file_shape().len() == 2 {
            want.push(spec.rows as u64);
        }
        if info.dims != want {
            return Err(Error::format(
                self.file.path(),
                format!(
                    "tensor {name:?} has dimensions {:?}, the model's configuration needs {want:?}",
                    info.dims
                ),
            ));
        }
        let values = self.file.read_f32(&name)?;
        Ok(match spec_permutation(&self.config, spec) {
            Some((heads, cols)) => permute_rows(&values, heads, cols, Direction::GgufToHf),
            None => values,
        })
    }
}
