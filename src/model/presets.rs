//! Named model shapes for benchmarks and tests (random weights of real architectures).

use super::config::{Activation, Family, ModelConfig, RopeScaling};
use crate::error::{Error, Result};

/// The names [`preset`] knows.
pub const PRESET_NAMES: [&str; 7] = [
    "smollm2-135m",
    "llama3.2-1b",
    "llama3-8b",
    "mistral-7b",
    "qwen2.5-7b",
    "gemma-7b",
    "tiny",
];

fn base(family: Family) -> ModelConfig {
    let gemma = family == Family::Gemma;
    ModelConfig {
        family,
        vocab_size: 0,
        hidden_size: 0,
        intermediate_size: 0,
        num_layers: 0,
        num_heads: 0,
        num_kv_heads: 0,
        head_dim: 0,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: gemma,
        qkv_bias: family == Family::Qwen2,
        qk_norm: family == Family::Qwen3,
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        norm_unit_offset: gemma,
        scale_embeddings: gemma,
    }
}

/// `(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim)`.
type Dims = (usize, usize, usize, usize, usize, usize, usize);

fn with_dims(family: Family, d: Dims) -> ModelConfig {
    ModelConfig {
        vocab_size: d.0,
        hidden_size: d.1,
        intermediate_size: d.2,
        num_layers: d.3,
        num_heads: d.4,
        num_kv_heads: d.5,
        head_dim: d.6,
        ..base(family)
    }
}

/// The configuration of a named shape.
pub fn preset(name: &str) -> Result<ModelConfig> {
    let llama3_rope = Some(RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    });
    Ok(match name {
        "smollm2-135m" => ModelConfig {
            tie_word_embeddings: true,
            rope_theta: 100000.0,
            ..with_dims(Family::Llama, (49152, 576, 1536, 30, 9, 3, 64))
        },
        "llama3.2-1b" => ModelConfig {
            tie_word_embeddings: true,
            rope_theta: 500000.0,
            rope_scaling: llama3_rope,
            ..with_dims(Family::Llama, (128256, 2048, 8192, 16, 32, 8, 64))
        },
        "llama3-8b" => ModelConfig {
            rope_theta: 500000.0,
            ..with_dims(Family::Llama, (128256, 4096, 14336, 32, 32, 8, 128))
        },
        "mistral-7b" => with_dims(Family::Mistral, (32000, 4096, 14336, 32, 32, 8, 128)),
        "qwen2.5-7b" => ModelConfig {
            rope_theta: 1000000.0,
            rms_norm_eps: 1e-6,
            ..with_dims(Family::Qwen2, (152064, 3584, 18944, 28, 28, 4, 128))
        },
        "gemma-7b" => ModelConfig {
            rms_norm_eps: 1e-6,
            ..with_dims(Family::Gemma, (256000, 3072, 24576, 28, 16, 16, 256))
        },
        "tiny" => tiny(Family::Llama),
        _ => {
            return Err(Error::InvalidArgument(format!(
                "unknown model shape {name:?} (known: {})",
                PRESET_NAMES.join(", ")
            )))
        }
    })
}

/// A two-layer model of `family` small enough for finite differences: vocab 64, hidden 32,
/// 4 query / 2 KV heads of 8.
pub fn tiny(family: Family) -> ModelConfig {
    with_dims(family, (64, 32, 48, 2, 4, 2, 8))
}
