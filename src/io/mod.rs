//! File formats: safetensors, Hugging Face model directories, PEFT adapters.

pub mod atomic;
pub mod safetensors;
