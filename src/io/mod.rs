//! File formats: safetensors, Hugging Face model directories, PEFT adapters.

pub mod atomic;
pub mod json;
pub mod model_dir;
pub mod peft;
pub mod safetensors;
