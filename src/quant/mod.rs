//! Quantized base weights for QLoRA: NF4 with double-quantized absmax, stored exactly as
//! bitsandbytes stores them ([`nf4`]), and reading bitsandbytes-4bit checkpoints ([`bnb`]).
//! CPU code: quantization, dequantization (whole or by rows) and validation.

pub mod bnb;
pub mod nf4;

pub use nf4::{Absmax, DoubleQuant, Nf4Tensor};

use crate::error::{Error, Result};

/// How a backend stores the frozen projection matrices of a model (`Slot::Proj`; the embedding,
/// the LM head and the norm weights are never quantized).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// The backend's own frozen format (f32 on the CPU, bf16 on a GPU).
    #[default]
    None,
    /// NF4 with double-quantized absmax (QLoRA), dequantized on the fly for each product.
    Nf4,
}

impl Quantization {
    /// Parses "none" or "nf4".
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "none" => Ok(Quantization::None),
            "nf4" => Ok(Quantization::Nf4),
            other => Err(Error::InvalidArgument(format!(
                "unknown quantization {other:?} (expected none or nf4)"
            ))),
        }
    }

    /// The name [`Quantization::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Nf4 => "nf4",
        }
    }
}
