//! GGUF, llama.cpp's single-file model format: reading (every common block type, dequantized to
//! f32), writing (v3), the llama-architecture tensor and key names, and the tokenizer it embeds.
//!
//! Layout of a file (all integers little-endian):
//!
//! ```text
//!   "GGUF" u32 version (2 or 3) u64 tensor_count u64 metadata_kv_count
//!   metadata_kv_count × { string key, u32 value_type, value }
//!   tensor_count × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
//!   padding to `general.alignment` (default 32)
//!   tensor data; each tensor at data_start + offset, offsets multiples of the alignment
//! ```
//! A string is `u64 length` + UTF-8 bytes; an array is `u32 element_type, u64 count, elements`.
//! `ne[0]` is the innermost (contiguous) dimension, so a PyTorch `[out, in]` weight has
//! `ne = [in, out]` and its rows are stored one after another as in row-major order.

pub mod config;
pub mod dequant;
pub mod export;
pub mod lora;
pub mod model;
pub mod names;
pub mod quant;
pub mod reader;
pub mod tokenizer;
pub mod types;
pub mod writer;

pub use reader::{GgufFile, GgufHeader, TensorInfo};
pub use types::{GgmlType, MetaValue, Metadata, ValueType};

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// Default and written alignment of tensor data.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// Whether `path` is a file starting with the GGUF magic.
pub fn is_gguf(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == MAGIC
}

/// Parses `bytes` as a GGUF file and reads everything a model load would: every tensor
/// (dequantized), the model configuration and the tokenizer. The fuzz target and the corpus
/// replay test run this; on any input it returns, never panics.
pub fn read_everything(bytes: &[u8]) -> Result<(), String> {
    let header = GgufHeader::parse(bytes)?;
    for t in &header.tensors {
        reader::read_tensor_f32(bytes, t);
    }
    tokenizer::from_metadata(&header.metadata)?;
    config::model_config(&header)?;
    Ok(())
}
