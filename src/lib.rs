//! libfinetune: embeddable LoRA fine-tuning of Llama-family decoder models.

pub mod error;
pub mod generate;
pub mod io;
pub mod lora;

pub use error::{Error, Result};
pub mod api;
pub mod backend;
pub mod bench;
pub mod capi;
pub mod data;
pub mod model;
pub mod quant;
pub mod rng;
pub mod train;
