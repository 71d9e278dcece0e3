//! File formats: safetensors, Hugging Face model directories, PEFT adapters, GGUF.

pub mod atomic;
pub mod gguf;
pub mod json;
pub mod model_dir;
pub mod peft;
pub mod safetensors;
