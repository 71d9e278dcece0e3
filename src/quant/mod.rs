//! Quantized base weights for QLoRA: NF4 with double-quantized absmax, stored exactly as
//! bitsandbytes stores them ([`nf4`]), and reading bitsandbytes-4bit checkpoints ([`bnb`]).
//! CPU code: quantization, dequantization (whole or by rows) and validation.

pub mod bnb;
pub mod nf4;

pub use nf4::{Absmax, DoubleQuant, Nf4Tensor};
